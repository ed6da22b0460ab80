"""The prepared-data cache: one token store per (data file, tokenizer, template, --seq-len, options).

    <root>/<key>/   a complete store (store.py), never modified once in place
    <root>/.tmp-*   a preparation in progress (or killed), never read

The root is `--data-cache`, else `data/` in minilora's cache root (cache_root.py: `$MINILORA_CACHE`,
else `$XDG_CACHE_HOME/minilora`, else `~/.cache/minilora`). A store is prepared in a temporary folder
and renamed into place only when complete, so a killed preparation leaves nothing that is later trusted;
on load its files are checked against the sizes and SHA-256 digests recorded in its meta.json, and what it
records having been made from (store_identity) against what is asked for. Removing the root (or any
`<key>` folder) is always safe: it is prepared again on the next run.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from minilora.cache_root import cache_root
from minilora.data.store import ARRAYS, expected_sizes
from minilora.data.tokenize import PLAIN_PROMPT, PLAIN_PROMPT_WITH_INPUT
from minilora.errors import UserError

# Bumped whenever preparation would produce other tokens, masks or counts for the same inputs.
STORE_VERSION = 1


def default_root() -> Path:
    return cache_root() / "data"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """What decides the tokens: the tokenizer's full definition, its specials and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "class": type(tokenizer).__name__,
        "definition": backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "specials": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)],
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def store_identity(data_sha256: str, tokenizer, seq_len: int, skip_bad_lines: bool) -> dict:
    """Everything a store's tokens depend on. It names the store's folder (cache_key) and is recorded in the
    store's meta.json, which must match it before the store is used: a folder's name alone proves nothing
    (two folders swapped or copied by hand would train on another file's tokens)."""
    return {"version": STORE_VERSION, "data_sha256": data_sha256, "tokenizer": tokenizer_digest(tokenizer),
            "seq_len": seq_len, "skip_bad_lines": skip_bad_lines,
            "plain_prompts": [PLAIN_PROMPT, PLAIN_PROMPT_WITH_INPUT]}


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


# meta.json holds counts, sizes, digests and the skipped lines' reasons (--skip-bad-lines); beyond this it
# is not a store's (and would not be read into memory)
_MAX_META_BYTES = 256 << 20
_IDS_DTYPES = ("uint8", "uint16", "uint32", "int64")  # what store.ids_dtype writes


def read_verified(folder: Path, identity: dict) -> dict | None:
    """The meta of a complete, intact store in `folder` made for `identity`, or None (missing, partial,
    damaged, or made from other inputs)."""
    try:
        if (folder / "meta.json").stat().st_size > _MAX_META_BYTES:
            return None
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        sizes = {name: (folder / f"{name}.bin").stat().st_size for name in ARRAYS}
        if (not isinstance(meta, dict) or meta.get("identity") != identity or meta.get("ids_dtype") not in _IDS_DTYPES
                or sizes != meta.get("sizes") or sizes != expected_sizes(meta)):
            return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    digests = {name: file_sha256(folder / f"{name}.bin") for name in ARRAYS}
    return meta if digests == meta.get("sha256") else None


def new_build_folder(root: Path, key: str) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file (or /dev/null) where the folder should be, or no permission
        raise UserError(f"data cache {root}: cannot be used as a folder ({err.strerror}); choose another with "
                        "--data-cache (or MINILORA_CACHE)") from None
    _remove_abandoned(root)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=root))


def publish(build: Path, target: Path, identity: dict) -> Path:
    """Rename the complete `build` folder to `target`; if another process got there first, keep theirs."""
    for f in build.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists() and read_verified(target, identity) is None:
        # A damaged store: move it out of the way (a process still mapping its files keeps them).
        stale = Path(tempfile.mkdtemp(prefix=f".tmp-stale-{os.getpid()}-", dir=target.parent))
        os.rename(target, stale / "store")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(build, target)
    except OSError:
        if read_verified(target, identity) is None:
            raise
        shutil.rmtree(build, ignore_errors=True)  # another process published the same store first
    return target


def _remove_abandoned(root: Path) -> None:
    """Temporary folders of preparations whose process is gone (killed, or on a crashed machine's disk)."""
    for folder in root.glob(".tmp-*"):
        try:
            pid = int(folder.name.split("-")[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue
