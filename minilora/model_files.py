"""A base model's identity by content: the SHA-256 of every file transformers may read from its folder
(weights, config, generation config, tokenizer, chat template).

A run's name for its base (`--model`) says nothing about what is in the folder: weights rescaled or a
chat template edited under the same name would make `--resume` continue on another model. A hub id is
identified by the files of its local snapshot (what was actually loaded), so it is known only once
they are there.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minilora.data.cache import file_sha256
from minilora.quant import BUILTIN_PREFIX, resolve_model_path

# What transformers reads from a model folder: weights (*.safetensors, *.bin and their index *.json),
# configs (*.json), tokenizers (tokenizer.model, vocab/merges *.txt, *.tiktoken), chat templates (*.jinja),
# and code for trust_remote_code models (*.py). READMEs, licences and images do not change the model.
MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")


def local_model_folder(name_or_path: str) -> Path | None:
    """The folder the model's files are read from: a local folder, the built-in model's, or a hub id's
    snapshot in the Hugging Face cache (None if it has not been downloaded)."""
    if name_or_path.startswith(BUILTIN_PREFIX) or Path(name_or_path).is_dir():
        return Path(resolve_model_path(name_or_path))
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not a hub id, or nothing of it downloaded yet (the library raises several kinds)
        return None


def model_file(name_or_path: str, filename: str) -> Path | None:
    """One file of the model, for loading it: from its local folder, or for a hub id from the Hugging Face
    cache, downloaded there first where it is missing (transformers' `cached_file`: the cache, offline mode
    and token that from_pretrained uses, so both fill and read the same snapshot that local_model_folder
    finds). None where the model has no such file."""
    from transformers.utils import cached_file

    found = cached_file(resolve_model_path(name_or_path), filename, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def model_file_digests(name_or_path: str) -> dict[str, str] | None:
    """{relative path: sha256} of the model's files, or None where they are not on this machine yet."""
    folder = local_model_folder(name_or_path)
    if folder is None:
        return None
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix in MODEL_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashlib releases the GIL: shards hash in parallel
        digests = list(pool.map(file_sha256, files))
    return {str(p.relative_to(folder)): d for p, d in zip(files, digests, strict=True)}


def describe_changes(old: dict, new: dict) -> str:
    """'model.safetensors changed, tokenizer.json added': which files differ between two digest maps."""
    parts = [f"{name} {'added' if name not in old else 'removed' if name not in new else 'changed'}"
             for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    return ", ".join(parts[:5]) + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")
