"""Every test that skips without CUDA carries the `gpu` marker, and every `gpu` test skips without CUDA.

benchmarks/gpu_suite.sh selects its tests with `pytest -m gpu`: a CUDA-only test without the marker runs
nowhere (skipped on CPU, deselected on the GPU). A test needs CUDA when
- a skipif mark on it (module, class, function or parameter) names CUDA or a GPU in its reason, or has a
  condition that reads CUDA in the source: seen on the tests as pytest collects them (in-process, ~4 s);
- it, a fixture it uses or a helper they call runs `pytest.skip(...)` with such a reason or under an `if`
  that reads CUDA, found by scanning the source of tests/ (a skip at run time has no mark to collect).
"""

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CUDA_WORDS = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)
# Files whose skip names CUDA but whose tests run on a CPU: file -> why.
NOT_GPU = {"test_kernel_compile.py": "compiles for sm_90/sm_80 on the CPU with the ptxas in the triton wheel"}


def _is_call_to(node: ast.AST, name: str) -> bool:
    """`pytest.name(...)`, `pytest.mark.name(...)` or `name(...)` imported from pytest."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return f.attr == name if isinstance(f, ast.Attribute) else isinstance(f, ast.Name) and f.id == name


def _skip_reason(call: ast.Call) -> str:
    """The source of `pytest.skip`'s reason (a literal, an f-string or an expression), or ''."""
    for kw in call.keywords:
        if kw.arg in ("reason", "msg"):
            return ast.unparse(kw.value)
    return ast.unparse(call.args[0]) if call.args else ""


def _ancestors(node: ast.AST, parents: dict) -> list[ast.AST]:
    chain = []
    while node in parents:
        node = parents[node]
        chain.append(node)
    return chain


def cuda_skipif_reasons(source: str) -> set[str]:
    """The reasons (as strings) of the skipif marks whose condition reads CUDA: they count as CUDA skips
    on the collected tests even when their words do not say so."""
    reasons = set()
    for node in ast.walk(ast.parse(source)):
        if _is_call_to(node, "skipif") and node.args and "cuda" in ast.unparse(node.args[0]).lower():
            reason = next((kw.value for kw in node.keywords if kw.arg == "reason"), None)
            if isinstance(reason, ast.Constant) and isinstance(reason.value, str):
                reasons.add(reason.value)
    return reasons


def runtime_cuda_skips(source: str) -> tuple[set[str], bool]:
    """(names of the top-level functions and methods that skip without CUDA at run time, directly or through
    a function of the same source they call; whether the module skips so at import without a module-level
    gpu mark, which would hide its tests from collection on a CPU)."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    skipping, module_level = set(), False
    for node in ast.walk(tree):
        if not _is_call_to(node, "skip"):
            continue
        conditions = [ast.unparse(p.test) for p in _ancestors(node, parents) if isinstance(p, ast.If)]
        if not (CUDA_WORDS.search(_skip_reason(node)) or any("cuda" in c.lower() for c in conditions)):
            continue
        functions = [p for p in _ancestors(node, parents) if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef))]
        if functions:
            skipping.add(functions[-1].name)  # the outermost: the test, fixture or helper itself
        else:
            module_level = True
    marks = [ast.unparse(n.value) for n in tree.body if isinstance(n, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)]
    module_level = module_level and not any("mark.gpu" in m for m in marks)
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and isinstance(parents[n], (ast.Module, ast.ClassDef))]
    calls = {d.name: {c.func.id if isinstance(c.func, ast.Name) else c.func.attr for c in ast.walk(d)
                      if isinstance(c, ast.Call) and isinstance(c.func, (ast.Name, ast.Attribute))} for d in defs}
    while new := {name for name, called in calls.items() if called & skipping} - skipping:
        skipping |= new
    return skipping, module_level


class _Collector:
    """Records what the CUDA check needs of each collected test (the items outlive their session)."""

    def __init__(self):
        self.tests = []

    def pytest_collection_finish(self, session):
        for item in session.items:
            skipifs = [(mark.kwargs.get("reason", ""), " ".join(a for a in mark.args if isinstance(a, str)))
                       for mark in item.iter_markers("skipif")]
            self.tests.append(dict(nodeid=item.nodeid, file=item.path.name,
                                   function=getattr(item, "originalname", item.name),
                                   fixtures=set(getattr(item, "fixturenames", ())),
                                   gpu=item.get_closest_marker("gpu") is not None, skipifs=skipifs))


@pytest.fixture(scope="module")
def needs_cuda_and_gpu():
    """({nodeid: why it needs CUDA}, {nodeids marked gpu}) over every test in tests/."""
    sources = {path.name: path.read_text() for path in TESTS.glob("*.py")}
    cuda_reasons = set().union(*(cuda_skipif_reasons(s) for s in sources.values()))
    runtime = {name: runtime_cuda_skips(source) for name, source in sources.items()}
    unmarked_modules = sorted(name for name, (_, unmarked) in runtime.items() if unmarked)
    assert not unmarked_modules, f"skip at import without CUDA, no pytestmark with pytest.mark.gpu: {unmarked_modules}"
    collector = _Collector()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = pytest.main([str(TESTS), "--collect-only", "-qq", "-p", "no:cacheprovider"], plugins=[collector])
    assert code == pytest.ExitCode.OK, f"collecting tests/ failed ({code!r}), nothing checked:\n{printed.getvalue()}"
    needs, gpu = {}, set()
    in_conftest = runtime.get("conftest.py", (set(), False))[0]
    for test in collector.tests:
        if test["gpu"]:
            gpu.add(test["nodeid"])
        if test["file"] in NOT_GPU:
            continue
        for reason, condition in test["skipifs"]:
            if CUDA_WORDS.search(reason + " " + condition) or reason in cuda_reasons:
                needs.setdefault(test["nodeid"], f"skipif: {reason}")
        skipping = runtime.get(test["file"], (set(), False))[0]
        if test["function"] in skipping:
            needs.setdefault(test["nodeid"], "pytest.skip in the test")
        elif used := test["fixtures"] & (skipping | in_conftest):
            needs.setdefault(test["nodeid"], f"pytest.skip in fixture {sorted(used)[0]}")
    assert needs, "no test skips without CUDA: the check is not seeing the marks"
    return needs, gpu


def test_a_test_that_skips_without_cuda_is_marked_gpu(needs_cuda_and_gpu):
    needs, gpu = needs_cuda_and_gpu
    unmarked = [f"{nodeid} ({why})" for nodeid, why in sorted(needs.items()) if nodeid not in gpu]
    assert not unmarked, "skip without CUDA but not marked gpu (pytest -m gpu misses them):\n" + "\n".join(unmarked)


def test_a_gpu_test_skips_without_cuda(needs_cuda_and_gpu):
    needs, gpu = needs_cuda_and_gpu
    assert not gpu - needs.keys(), f"marked gpu but no CUDA skip (fail on a CPU): {sorted(gpu - needs.keys())}"


def test_the_scan_finds_runtime_cuda_skips_in_tests_fixtures_and_helpers():
    source = '''
import pytest, torch

def need_device():
    if torch.cuda.device_count() == 0:
        pytest.skip("too slow here")  # a reason without the word: the condition says CUDA

@pytest.fixture
def device():
    need_device()
    return "cuda"

def test_takes_the_fixture(device): ...

def test_skips_itself():
    pytest.skip(reason="needs a CUDA GPU")

def test_skips_for_another_reason():
    pytest.skip("not yet")

skipped = pytest.mark.skipif(not torch.cuda.is_available(), reason="slow on a CPU")
'''
    assert runtime_cuda_skips(source) == ({"need_device", "device", "test_skips_itself"}, False)
    module_skip = "import pytest\npytest.skip('no CUDA', allow_module_level=True)\n"
    assert runtime_cuda_skips(module_skip) == (set(), True)
    assert runtime_cuda_skips(module_skip + "pytestmark = pytest.mark.gpu\n") == (set(), False)
    assert cuda_skipif_reasons(source) == {"slow on a CPU"}
