"""Where minilora keeps what it can rebuild (prepared data, the built-in demo models): one root for all."""

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MINILORA_CACHE`, else `$XDG_CACHE_HOME/minilora`, else `~/.cache/minilora`."""
    if os.environ.get("MINILORA_CACHE"):
        return Path(os.environ["MINILORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minilora"
