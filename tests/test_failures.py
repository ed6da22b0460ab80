"""The one place failures end: each class of failure is one line on stderr and its exit code."""

import errno
import re
from pathlib import Path

import pytest
import torch
from train_utils import DEMO

from minilora.cli_runner import describe, run_cli
from minilora.errors import DataError, UserError
from minilora.training.cli import run

CASES = {
    "bad input": (UserError("--r 0: the LoRA rank must be at least 1"), 2, "error: --r 0: the LoRA rank"),
    "bad data line": (DataError("my.jsonl", 3, "expected JSON"), 2, "error: my.jsonl:3: expected JSON"),
    "CUDA out of memory": (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 3,
                           "error: out of memory: CUDA out of memory"),
    "CPU allocator": (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                                   "you tried to allocate 1099511627776 bytes"), 3, "error: out of memory: [enforce"),
    "MemoryError": (MemoryError(), 3, "error: out of memory: MemoryError"),
    "disk full": (OSError(errno.ENOSPC, "No space left on device", "out/run.json"), 1,
                  "error: out/run.json: No space left on device"),
    "read-only": (OSError(errno.EROFS, "Read-only file system", "out"), 1, "error: out: Read-only file system"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_failure_class_is_one_line_with_its_exit_code(case):
    err, code, start = CASES[case]
    line, got = describe(err)
    assert got == code and line.startswith(start) and "\n" not in line, line


def test_an_unexpected_error_is_one_line_and_a_crash_log_with_the_traceback(capsys):
    def entry(argv):
        raise ValueError("something no check foresaw")

    assert run_cli(entry, []) == 1
    err = capsys.readouterr().err.strip()
    found = re.fullmatch(r"error: unexpected ValueError: something no check foresaw \(details in (\S+); "
                         r"please report it with that file: README.md, 'Reporting a bug'\)", err)
    assert found, err
    log = Path(found.group(1)).read_text()
    assert "Traceback (most recent call last)" in log and "something no check foresaw" in log
    # The environment, as `python -m minilora.env` prints it, for the bug report.
    assert re.search(r"^transformers +\d+\.\d+", log, re.M) and re.search(r"^fused kernels +(yes|no)", log, re.M)
    Path(found.group(1)).unlink()


def test_out_of_memory_while_loading_the_model_is_exit_3(tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    monkeypatch.setattr("minilora.training.job.load_base", oom)
    assert run(["--data", str(DEMO), "--model", "builtin:tiny-phi3", "--output", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of memory: DefaultCPUAllocator") and "\n" not in err
