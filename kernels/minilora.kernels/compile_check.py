"""Compile every Triton kernel launch minilora makes for a GPU, on a machine without one.

The CPU tests run the kernels in Triton's interpreter, which checks the math but not what only the GPU
compiler sees: whether each launch compiles for the target at all (bf16 paths, tl.dot shapes), how much
shared memory its pipeline needs, whether it spills registers, and whether its GEMMs reach the tensor
cores. This module answers those for an H100 (sm_90, default) or an A100 (sm_80) with Triton's own
compiler and the ptxas/cuobjdump that ship in the triton wheel:

    an offline Triton driver   reports the target, owns no device and launches nothing
    Triton's jit_cache_hook    is called with each launch's signature before Triton would compile it;
                               we compile it for the target, record its resources and return True,
                               which tells Triton not to compile or launch it itself
    the launchers              (fused_lora.py, nf4.py) run unchanged on `meta` tensors of
                               Phi-3-mini's layer shapes: no memory, no compute, the real dispatch
                               branches, tile configs and split-K sizes (the SM count is the target's)

Per distinct compiled kernel: registers per thread, local memory per thread (stack: spills), shared memory,
tensor-core instructions in the PTX (wgmma on sm_90, mma.sync), and the launches that use it.
Problems (exit 1): a launch that does not compile, shared memory over the target's per-block limit,
register spills or all 255 registers in use, a 16-bit GEMM that misses the tensor cores.

    python -m minilora.kernels.compile_check                  # sm_90, bf16 + fp16 + fp32, all shapes
    python -m minilora.kernels.compile_check --arch 80 --dtypes bfloat16 --json out.json
    python -m minilora.kernels.compile_check --arch 90 --out benchmarks/results
                        # also writes benchmarks/results/<date>-kernel-compile-sm90-triton<x.y>.md

Must run without TRITON_INTERPRET (the kernels must be compiled, not interpreted).
"""

import argparse
import datetime
import itertools
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import fused_lora, nf4
from .tiles import KernelConfig

# (N out, K in) of the four Phi-3-mini linears LoRA targets: hidden_size 3072, intermediate_size 8192,
# 32 query and 32 key-value heads (https://huggingface.co/microsoft/Phi-3-mini-4k-instruct, config.json).
PHI3 = {"qkv_proj": (9216, 3072), "o_proj": (3072, 3072), "gate_up_proj": (16384, 3072),
        "down_proj": (3072, 8192)}

# Per target: SM count (split-K sizes depend on it) and the most shared memory one block may use
# (CUDA C Programming Guide, "Compute capabilities" table: 227 KiB on 9.0, 163 KiB on 8.0).
TARGETS = {90: {"name": "H100 (sm_90)", "sms": 132, "max_shared": 227 * 1024},
           80: {"name": "A100 (sm_80)", "sms": 108, "max_shared": 163 * 1024}}
# Every tile config the dispatcher can pick: split-K with 16, 32 and 64 rows, tiled, dequant + cuBLAS.
MS = [1, 16, 32, 64, 256, 384, 1024, 4096, 8192]
RANK = 8
GEMM_KERNELS = ("_fwd_kernel", "_dx_kernel")
MAX_REGISTERS = 255  # per thread, on every NVIDIA GPU since Kepler


@dataclass
class Compiled:
    """One distinct compiled kernel (a specialisation: signature, constexprs, launch options)."""

    kernel: str
    constants: dict
    options: dict
    signature: dict
    error: str | None = None
    registers: int | None = None
    stack_bytes: int | None = None  # per thread: spilled registers and local arrays live here
    local_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_cores: str | None = None
    compile_s: float = 0.0
    launches: list = field(default_factory=list)


class OfflineDriver:
    """The part of a Triton driver that compiling needs: a target and a device index, nothing to run on."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


class Recorder:
    """jit_cache_hook: compiles each distinct launch once for the target and records what used it."""

    def __init__(self, arch: int):
        self.arch = arch
        self.compiled: dict[str, Compiled] = {}
        self.label = ""

    def __call__(self, key, repr, fn, compile, is_manual_warmup, already_compiled):
        entry = self.compiled.get(str(key))
        if entry is None:
            options = {k: compile[k] for k in ("num_warps", "num_stages", "enable_fp_fusion")}
            names = fn.jit_function.arg_names  # constants are keyed by argument index paths, e.g. (21,)
            constants = {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k): _plain(v)
                         for k, v in compile["constants"].items()}
            entry = Compiled(fn.name, constants, options, dict(compile["signature"]))
            self._compile(entry, fn.jit_function, compile)
            self.compiled[str(key)] = entry
        entry.launches.append(self.label)
        return True  # Triton neither compiles nor launches it

    def _compile(self, entry: Compiled, jit_function, compile) -> None:
        import triton
        from triton.compiler import ASTSource
        from triton.runtime.driver import driver

        t0 = time.perf_counter()
        try:
            src = ASTSource(jit_function, compile["signature"], compile["constants"], compile["configs"][0])
            kernel = triton.compile(src, target=driver.active.get_current_target(), options=entry.options)
        except Exception as err:  # noqa: BLE001 - any compiler failure is the finding
            entry.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
            return
        finally:
            entry.compile_s = time.perf_counter() - t0
        entry.shared_bytes = int(kernel.metadata.shared)
        ptx = kernel.asm["ptx"]
        entry.tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
        entry.registers, entry.stack_bytes, entry.local_bytes = _resource_usage(kernel.asm["cubin"])


def git_commit() -> str:
    """The checkout's commit ("+dirty" with changes), "unknown" outside a git checkout."""
    try:
        run = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=40", "--exclude=*"],
                             capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return run.stdout.strip() or "unknown"


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, local bytes) per thread, from cuobjdump's resource report."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                capture_output=True, text=True, timeout=60).stdout
    fields = dict(item.split(":", 1) for line in report.splitlines() if "REG:" in line for item in line.split())
    return int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"])


def record_launches(recorder: Recorder, dtypes: list[torch.dtype], shapes: list[str], ms: list[int]) -> None:
    """Runs the host launchers on meta tensors for every case; the recorder sees each kernel launch."""
    config = KernelConfig(meta_sm_count=TARGETS[recorder.arch]["sms"])  # split-K sizes as on the target
    meta = torch.device("meta")

    for dtype, name, m in itertools.product(dtypes, shapes, ms):
        n, k = PHI3[name]
        tag = f"{str(dtype).removeprefix('torch.')} {name} M={m}"
        pk = _packed(n, k, nested=True, device=meta)
        x = torch.empty(m, k, dtype=dtype, device=meta)
        s = torch.empty(m, RANK, dtype=dtype, device=meta)
        lora_A = torch.empty(RANK, k, device=meta)
        lora_B = torch.empty(n, RANK, device=meta)
        dy = torch.empty(m, n, dtype=dtype, device=meta)
        branch = config.branch_for(m, dtype)
        recorder.label = f"forward {tag} ({branch})"
        fused_lora.base_lora_forward(x, pk, s, lora_B, 2.0, None, config=config)
        recorder.label = f"dX {tag} ({branch})"
        fused_lora.base_lora_dx(dy, pk, s, lora_A, config=config)
        recorder.label = f"dX with dropout {tag} ({branch})"
        fused_lora.base_lora_dx(dy, pk, None, None, config=config)
    # The variants the Phi-3 shapes do not reach: a bias, plain (not double-quantized) absmax.
    n, k = PHI3[shapes[0]]
    for dtype, m in itertools.product(dtypes, (16, 256)):
        tag = f"{str(dtype).removeprefix('torch.')} {shapes[0]} M={m}"
        x = torch.empty(m, k, dtype=dtype, device=meta)
        s = torch.empty(m, RANK, dtype=dtype, device=meta)
        lora_B = torch.empty(n, RANK, device=meta)
        recorder.label = f"forward + bias {tag}"
        fused_lora.base_lora_forward(x, _packed(n, k, True, meta), s, lora_B, 2.0,
                                     torch.empty(n, dtype=dtype, device=meta), config=config)
        recorder.label = f"forward, no double quant {tag}"
        fused_lora.base_lora_forward(x, _packed(n, k, False, meta), s, lora_B, 2.0, None, config=config)
        recorder.label = f"dequantize, no double quant {tag}"
        nf4.dequantize_packed(_packed(n, k, False, meta), dtype)


def _packed(n: int, k: int, nested: bool, device: torch.device):
    """A Packed4bit with bitsandbytes' dtypes and sizes (blocksize 64, nested 256) and no data."""
    blocks = n * k // 64
    data = torch.empty((n * k + 1) // 2, dtype=torch.uint8, device=device)
    code = torch.empty(16, device=device)
    if not nested:
        return nf4.Packed4bit(data, torch.empty(blocks, device=device), code, code, code, code, False, 64, 1, n, k)
    return nf4.Packed4bit(data, torch.empty(blocks, dtype=torch.uint8, device=device), code,
                          torch.empty(-(-blocks // 256), device=device), torch.empty(256, device=device),
                          torch.empty((), device=device), True, 64, 256, n, k)


def problems(compiled: list[Compiled], arch: int) -> list[str]:
    """What would fail or run badly on the target."""
    found = []
    limit = TARGETS[arch]["max_shared"]
    for c in compiled:
        where = f"{c.kernel} {_config(c)} (first used by: {c.launches[0]})"
        if c.error:
            found.append(f"{where}: does not compile: {c.error}")
            continue
        if c.shared_bytes > limit:
            found.append(f"{where}: needs {c.shared_bytes} B of shared memory, the limit is {limit}")
        if c.stack_bytes or c.local_bytes:
            found.append(f"{where}: {c.stack_bytes + c.local_bytes} B per thread in local memory "
                         f"(spilled registers; {c.registers} registers)")
        elif c.registers >= MAX_REGISTERS:
            found.append(f"{where}: uses all {MAX_REGISTERS} registers per thread (one step from spilling)")
        sixteen_bit = any(t in c.signature.get("x_ptr", "") + c.signature.get("dy_ptr", "") for t in ("fp16", "bf16"))
        if c.kernel in GEMM_KERNELS and sixteen_bit and c.tensor_cores == "none":
            found.append(f"{where}: a 16-bit GEMM without tensor-core instructions")
    return found


def _config(c: Compiled) -> str:
    keys = ("BM", "BN", "BK", "R_PAD", "HAS_LORA", "HAS_BIAS", "PARTIAL", "NESTED", "OUT_BF16", "BLOCK")
    dtype = next((v for k, v in c.signature.items() if k in ("x_ptr", "dy_ptr", "out_ptr")), "")
    parts = [dtype.lstrip("*")] + [f"{k}={c.constants[k]}" for k in keys if k in c.constants]
    return " ".join(parts + [f"warps={c.options['num_warps']}", f"stages={c.options['num_stages']}"])


def markdown(compiled: list[Compiled], arch: int, found: list[str], seconds: float) -> str:
    import triton

    target = TARGETS[arch]
    lines = [f"# Triton kernels compiled for {target['name']}, without a GPU", "",
             f"{len(compiled)} distinct kernels from {sum(len(c.launches) for c in compiled)} launches, "
             f"compiled by triton {triton.__version__} in {seconds:.0f} s (less where Triton's on-disk "
             f"cache already held a kernel), commit {git_commit()}. "
             f"Shared memory limit per block: {target['max_shared']} B.", "",
             "| kernel | config | registers | local B | shared B | tensor cores | launches | e.g. |",
             "|---|---|---:|---:|---:|---|---:|---|"]
    for c in sorted(compiled, key=lambda c: (c.kernel, _config(c))):
        if c.error:
            lines.append(f"| {c.kernel} | {_config(c)} | - | - | - | ERROR: {c.error} | {len(c.launches)} | "
                         f"{c.launches[0]} |")
        else:
            local = c.stack_bytes + c.local_bytes
            lines.append(f"| {c.kernel} | {_config(c)} | {c.registers} | {local} | {c.shared_bytes} | "
                         f"{c.tensor_cores} | {len(c.launches)} | {c.launches[0]} |")
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in found] or ["none"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, choices=sorted(TARGETS), default=90, help="CUDA compute capability x10")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"],
                   choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shapes", nargs="+", default=list(PHI3), choices=list(PHI3))
    p.add_argument("--ms", nargs="+", type=int, default=MS, help=f"rows M (default {MS})")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--out", help="also write the report as <out>/<date>-kernel-compile-sm<arch>-triton<x.y>.md "
                                 "(e.g. benchmarks/results)")
    args = p.parse_args(argv)
    if nf4.interpreted():
        print("compile_check: unset TRITON_INTERPRET: this compiles the kernels for the GPU", file=sys.stderr)
        return 2
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    t0 = time.perf_counter()
    recorder = Recorder(args.arch)
    # For the rest of this process, Triton compiles for the target and launches nothing.
    driver.set_active(OfflineDriver(GPUTarget("cuda", args.arch, 32)))
    knobs.runtime.jit_cache_hook = recorder
    record_launches(recorder, [getattr(torch, d) for d in args.dtypes], args.shapes, args.ms)
    compiled = list(recorder.compiled.values())
    found = problems(compiled, args.arch)
    report = markdown(compiled, args.arch, found, time.perf_counter() - t0)
    print(report)
    if args.out:
        version = ".".join(triton.__version__.split(".")[:2])
        path = Path(args.out) / f"{datetime.date.today()}-kernel-compile-sm{args.arch}-triton{version}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
        print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "target": TARGETS[args.arch]["name"],
                                               "triton": triton.__version__, "commit": git_commit(),
                                               "kernels": [asdict(c) for c in compiled], "problems": found},
                                              indent=1) + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
