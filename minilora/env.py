"""`python -m minilora.env`: what a bug report needs, in one screen.

    python -m minilora.env            versions, device, whether the fused kernels run here, caches
    python -m minilora.env --check    also run the fused kernels against PyTorch on this machine

Versions come from the installed packages' metadata (nothing is imported to learn them); torch is
imported for the device, bitsandbytes for its backend. Every row is filled even when a package is
missing or broken: the report is also written into the crash log of an unexpected error.
"""

import argparse
import importlib.metadata
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

# Packages a QLoRA run depends on, in the order a reader looks for them; peft is only the tests' reference
# and `kernels` is Hugging Face's hub kernels package (transformers 5.25+ imports it), listed because a
# wrong one installed there is a known way to break transformers.
PACKAGES = ("torch", "transformers", "bitsandbytes", "triton", "safetensors", "tokenizers", "numpy", "peft",
            "kernels")


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def folder_size(root: Path) -> str:
    """`<path> (<size>, <n> files)`, or `<path> (absent)`; symlinks are not followed."""
    if not root.is_dir():
        return f"{root} (absent)"
    total = files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
                files += 1
            except OSError:
                continue  # removed while walking
    return f"{root} ({total / 2**20:,.1f} MiB, {files:,} files)"


def _torch_rows() -> Iterator[tuple[str, str]]:
    import torch

    yield "torch CUDA build", torch.version.cuda or "none (CPU build)"
    if not torch.cuda.is_available():
        yield "device", f"CPU, {os.cpu_count()} cores (no CUDA device)"
        return
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        yield f"device cuda:{i}", (f"{props.name}, compute capability {props.major}.{props.minor}, "
                                   f"{props.total_memory / 2**30:.1f} GiB")


def _bitsandbytes_backend() -> str:
    from bitsandbytes import cextension

    return getattr(cextension, "BNB_BACKEND", "unknown")


def fused_kernels_verdict() -> str:
    """Whether a LoRA layer over a 4-bit base would take the fused Triton kernels here, and if not why."""
    import torch

    from minilora import dispatch
    from minilora.errors import UserError

    if dispatch.default_mode() == "torch":
        return "no: MINILORA_KERNELS=torch chooses PyTorch"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not dispatch.kernels_interpreted():
        return ("no: no CUDA device (PyTorch computes every layer; TRITON_INTERPRET=1 with --kernels triton runs "
                "the kernels in Triton's interpreter, for tests)")
    try:
        dispatch.check_kernel_mode("triton", device)
    except UserError as err:
        return f"no: {err}"
    where = "in Triton's interpreter (TRITON_INTERPRET=1; --kernels triton only)" if device == "cpu" else "on cuda"
    return f"yes, {where}, for layers whose shapes they support (`--check` tests them here)"


def report() -> list[tuple[str, str]]:
    """(label, value) rows; a part that fails says why in its row instead of raising."""
    import minilora
    from minilora.builtin import default_cache_dir
    from minilora.data.cache import default_root

    rows = [("minilora", f"{minilora.__version__} ({Path(minilora.__file__).parent})"),
            ("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", platform.platform())]
    rows += [(name, installed_version(name)) for name in PACKAGES]
    for label, part in (("torch", lambda: list(_torch_rows())), ("bitsandbytes backend", _bitsandbytes_backend),
                        ("fused kernels", fused_kernels_verdict)):
        try:
            got = part()
        except Exception as err:  # a broken install is what this report is for
            got = f"unavailable ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''})"
        rows += got if isinstance(got, list) else [(label, got)]
    for name in ("MINILORA_KERNELS", "MINILORA_CACHE", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES"):
        if name in os.environ:
            rows.append((name, os.environ[name]))
    rows += [("data cache", folder_size(default_root())), ("builtin models", folder_size(default_cache_dir()))]
    return rows


def format_report(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def check_kernels() -> list[str]:
    """Run the fused kernels against PyTorch on this machine: one line per dtype, 'FAILED' where they differ."""
    import torch

    from minilora import dispatch
    from minilora.kernel_check import check_kernels

    if torch.cuda.is_available():
        device, dtypes = "cuda", (torch.bfloat16, torch.float16, torch.float32)
    elif dispatch.kernels_interpreted():
        device, dtypes = "cpu", (torch.float32,)  # the interpreter's bf16 dot is wrong; fp32 checks the code
    else:
        return ["check: no CUDA device, nothing to check (TRITON_INTERPRET=1 checks the kernels in Triton's "
                "interpreter, fp32)"]
    lines = []
    for dtype in dtypes:
        failed = check_kernels(device, dtype)
        lines.append(f"check {device} {str(dtype).removeprefix('torch.')}: "
                     f"{'ok, equal to PyTorch' if failed is None else 'FAILED: ' + failed}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minilora.env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="also run the fused kernels against PyTorch here (CUDA; or TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    print(format_report(report()))
    if args.check:
        lines = check_kernels()
        print("\n".join(lines))
        return 1 if any("FAILED" in line for line in lines) else 0
    return 0


if __name__ == "__main__":
    # Not through cli_runner.run_cli: its crash log calls this report (every part of which is guarded).
    sys.exit(main())
