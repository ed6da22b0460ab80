"""The prepared-data cache: one token store per (data file, tokenizer, template, --seq-len, options).

    <root>/<key>/   a complete store (store.py), never modified once in place
    <root>/.tmp-*   a preparation in progress (or killed), never read

The root is `--data-cache`, else `data/` in minilora's cache root (cache_root.py: `$MINILORA_CACHE`,
else `$XDG_CACHE_HOME/minilora`, else `~/.cache/minilora`). A store is prepared in a temporary folder
and renamed into place only when complete, so a killed preparation leaves nothing that is later trusted;
on load its files are checked against the sizes and SHA-256 digests recorded in its meta.json. Removing the root (or any
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


def cache_key(data_sha256: str, tokenizer, seq_len: int, skip_bad_lines: bool) -> str:
    parts = [STORE_VERSION, data_sha256, tokenizer_digest(tokenizer), seq_len, skip_bad_lines,
             PLAIN_PROMPT, PLAIN_PROMPT_WITH_INPUT]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def read_verified(folder: Path) -> dict | None:
    """The meta of a complete, intact store in `folder`, or None (missing, partial or damaged)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        sizes = {name: (folder / f"{name}.bin").stat().st_size for name in ARRAYS}
    except (OSError, ValueError):
        return None
    if meta.get("version") != STORE_VERSION or sizes != meta.get("sizes") or sizes != expected_sizes(meta):
        return None
    digests = {name: file_sha256(folder / f"{name}.bin") for name in ARRAYS}
    return meta if digests == meta.get("sha256") else None


def new_build_folder(root: Path, key: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=root))


def publish(build: Path, target: Path) -> Path:
    """Rename the complete `build` folder to `target`; if another process got there first, keep theirs."""
    for f in build.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if target.exists() and read_verified(target) is None:
        # A damaged store: move it out of the way (a process still mapping its files keeps them).
        stale = Path(tempfile.mkdtemp(prefix=f".tmp-stale-{os.getpid()}-", dir=target.parent))
        os.rename(target, stale / "store")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(build, target)
    except OSError:
        if read_verified(target) is None:
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
