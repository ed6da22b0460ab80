"""Where a base model's files are, and its identity by content.

A name (`--model`: a local folder, a hub id, `builtin:tiny-phi3`) resolves to files here: the loaders
read them through `model_file` (a hub id's from the Hugging Face cache, fetched there if missing), and a
folder that cannot be a model raises `unloadable_model`'s one-line error. The identity is the SHA-256 of
every file transformers may read from the folder (weights, config, generation config, tokenizer, chat
template).

A run's name for its base (`--model`) says nothing about what is in the folder: weights rescaled or a
chat template edited under the same name would make `--resume` continue on another model. A hub id is
identified by the files of its local snapshot (what was actually loaded), so it is known only once
they are there.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minilora.data.cache import file_sha256
from minilora.errors import UserError

# What transformers reads from a model folder: weights (*.safetensors, *.bin and their index *.json),
# configs (*.json), tokenizers (tokenizer.model, vocab/merges *.txt, *.tiktoken), chat templates (*.jinja),
# and code for trust_remote_code models (*.py). READMEs, licences and images do not change the model.
MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
BUILTIN_PREFIX = "builtin:"  # `builtin:tiny-phi3`: the demo model minilora makes in code (minilora/builtin.py)


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:<name>` -> the folder of the built-in demo model; anything else unchanged."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        from minilora.builtin import resolve_builtin

        return str(resolve_builtin(name_or_path[len(BUILTIN_PREFIX):]))
    return name_or_path


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


def unloadable_model(name_or_path: str, err: Exception, what: str = "cannot load it") -> Exception:
    """What to raise when transformers cannot build or load a model: a model folder is input, and its
    config or weights fail in many ways (truncated safetensors, `"hidden_size": "big"`, a pad id past the
    vocabulary, heads that do not divide the width), each raising its own exception type. Out of memory
    stays itself (its own exit code)."""
    from minilora.cli_runner import is_out_of_memory

    if is_out_of_memory(err) or isinstance(err, UserError):
        return err
    text = (str(err).strip().splitlines() or [""])[0][:200]
    return UserError(f"base model {name_or_path}: {what} ({type(err).__name__}: {text})")
