"""Ranks of a gloo process group as forked copies of the test process, for tests that drive FSDP directly.

Forking starts each rank from this process's imports (spawning re-imports torch, transformers and bitsandbytes,
most of such a test's time on two cores)."""

import gc
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_forked_ranks(fn, world: int, *args) -> None:
    """fn(rank, world, port, *args) in `world` forked processes; raises if any rank fails.

    Collected first: an earlier test's (destroyed) process group may still sit in a reference cycle here, and a
    child collecting it runs its destructor against gloo threads a fork does not copy: a hang or a crash."""
    import torch.multiprocessing as mp

    gc.collect()
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="fork")
