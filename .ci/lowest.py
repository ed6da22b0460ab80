"""Print the lowest versions pyproject.toml allows, as pip constraints: each `name>=X` of the dependencies
and the test extra becomes `name==X`. `.ci/run` installs the project under them to test the bottom of
every range (transitive dependencies resolve as usual)."""

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
for requirement in requirements:
    found = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)\s*(;.*)?$", requirement)
    if not found:
        sys.exit(f"pyproject.toml: {requirement!r}: every dependency needs a lower bound (name>=X)")
    name, lowest, marker = found.groups()
    print(f"{name}=={lowest}{' ' + marker if marker else ''}")
