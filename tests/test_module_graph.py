"""The shape of the code: leaves do not call back up. No module of minilora imports one that imports it
back (directly or through others, lazy imports inside functions included), and the kernels import nothing
from the rest of minilora."""

import ast
from pathlib import Path

from train_utils import ROOT

KERNELS = ROOT / "kernels" / "minilora.kernels"


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name (kernels/minilora.kernels/ installs as
    minilora.kernels)."""
    found = {}
    for path in (ROOT / "minilora").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in KERNELS.glob("*.py"):
        found["minilora.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `name` imports anywhere in its file (the package root `minilora`, a
    facade that imports on attribute access, left out)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module if not node.level else ".".join(filter(None, [base, node.module]))
            targets |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    out = set()
    for target in targets:
        while target and target not in known:  # `from minilora.x import f` is an import of minilora.x
            target = target.rpartition(".")[0]
        if target and target not in (name, "minilora"):
            out.add(target)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert len(graph) > 40 and graph["minilora.training.job"]  # the scan saw the package and its imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_a_third_module():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_kernels_import_nothing_from_minilora():
    """minilora.kernels stands alone: what a kernel needs is passed in (the LoRA dropout, the tiles)."""
    known = modules()
    kernels = [name for name in known if name.startswith("minilora.kernels")]
    assert len(kernels) >= 7
    outside = {name: sorted(t for t in imported(name, known[name], known) if not t.startswith("minilora.kernels"))
               for name in kernels}
    assert {name: t for name, t in outside.items() if t} == {}
