"""Find the Triton kernels package whether minilora is installed or used from a checkout.

`kernels/` sits at the repository root (project layout) and installs as `minilora.kernels`
(pyproject's package-dir). It is never imported as a top-level `kernels`: a PyPI project of that
name exists, and transformers and bitsandbytes import it when it is there.
"""

import importlib
import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

_NAME = "minilora.kernels"


@cache
def load_kernels() -> ModuleType:
    """Import the kernels package (this imports triton; call it only when kernels are wanted)."""
    try:
        return importlib.import_module(_NAME)
    except ModuleNotFoundError as err:
        if err.name != _NAME:
            raise
    # An uninstalled checkout (PYTHONPATH=<repo>): load <repo>/kernels under the installed name.
    root = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        _NAME, root / "__init__.py", submodule_search_locations=[str(root)]
    )
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"minilora's Triton kernels were not found at {root}", name=_NAME)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_NAME]
        raise
    return module
