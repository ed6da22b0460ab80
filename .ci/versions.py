"""The versions CI tests: the lock, the bottom of every range, and what moved since the lock.

    python .ci/versions.py lowest           pip constraints pinning each dependency to its lower bound
    python .ci/versions.py compare FILE     this environment's packages that differ from FILE's pins
    python .ci/versions.py lock             write constraints.txt from this environment (after its tests pass)

`lowest` reads pyproject.toml: each `name>=X` of the dependencies and the test extra becomes `name==X`
(transitive dependencies resolve as usual). `compare` and `lock` read the environment of the Python that
runs them.
"""

import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
LOCK_HEADER = """\
# The versions the whole test suite last passed on (CPU, Python 3.11): what the README's commands install.
# Updated on purpose, never by hand: in a fresh venv, `pip install torch==2.13.0 -e ".[test]"` (the newest
# versions pyproject.toml allows; torch stays on the release whose CPU build the package index serves),
# `python -m pytest`, and when it passes `python .ci/versions.py lock`.
# pyproject.toml keeps ranges for projects that embed minilora; .ci/run also tests both ends of them.
"""


def lowest() -> list[str]:
    import tomllib  # Python 3.11+: CI's interpreter

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = []
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        found = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*(;.*)?$", requirement)
        if not found:
            sys.exit(f"pyproject.toml: {requirement!r}: every dependency needs a lower bound (name>=X)")
        name, version, marker = found.groups()
        lines.append(f"{name}=={version}{' ' + marker if marker else ''}")
    return lines


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """canonical name -> version of this environment's distributions, minilora itself left out."""
    found = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    for name in ("minilora", "pip"):  # the project itself, and the installer
        found.pop(name, None)
    return found


def pins(path: Path) -> dict[str, str]:
    """canonical name -> version of the `name==version` lines of a constraints file."""
    out = {}
    for line in path.read_text().splitlines():
        found = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if found:
            out[canonical(found.group(1))] = found.group(2)
    return out


def base_version(version: str) -> str:
    return version.split("+", 1)[0]  # 2.13.0+cpu is the 2.13.0 release, built for the CPU


def compare(path: Path) -> list[str]:
    want, have = pins(path), installed()
    moved = [f"  {name}: {want[name]} -> {have[name]}" for name in sorted(want.keys() & have.keys())
             if base_version(want[name]) != base_version(have[name])]
    added = [f"  {name}: {have[name]} (not in {path.name})" for name in sorted(have.keys() - want.keys())]
    if not moved and not added:
        return [f"versions: as in {path.name}"]
    return [f"versions that differ from {path.name}:", *moved, *added]


def lock() -> None:
    body = [f"{name}=={base_version(version)}" for name, version in sorted(installed().items())]
    LOCK.write_text(LOCK_HEADER + "\n".join(body) + "\n")
    print(f"wrote {LOCK} ({len(body)} packages)")


def main(argv: list[str]) -> int:
    if argv[:1] == ["lowest"] and len(argv) == 1:
        print("\n".join(lowest()))
    elif argv[:1] == ["compare"] and len(argv) == 2:
        print("\n".join(compare(Path(argv[1]))))
    elif argv == ["lock"]:
        lock()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
