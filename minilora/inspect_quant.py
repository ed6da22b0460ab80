"""The inspector's view of the 4-bit base (`python -m minilora.inspect ADAPTER --model BASE`): how far
quantization moved each adapted weight, and how much of that the adapter's initial and trained updates
cancel. Per module, with W the full-precision weight (in the compute dtype the run quantized from):

    quant_error    ||W - deq(Q)||_F / ||W||_F, Q = nf4(W): the ordinary 4-bit base the saved adapter sits on
    init_error     ||W - W0||_F / ||W||_F, W0 = the model training started from: deq(Q) + scale · B0 A0
                   (zeros: B0 = 0; loftq: B0 A0 recomputed from W as the run computed it); for pissa/olora
                   W0 = deq(nf4(W - scale · B0 A0)) + scale · B0 A0, so this is the residual base's error,
                   with A0, B0 read from the converted adapter's second halves
    trained_error  ||W - deq(Q) - ΔW||_F / ||W||_F, ΔW = the saved adapter's update (converted for pissa/olora:
                   scale · (B A - B0 A0)): the adapter as PEFT and our loaders put it on the ordinary base
    init_cancelled, trained_cancelled   1 - error / quant_error: the share of the quantization error cancelled
                   (1: all of it, 0: none, negative: the update adds to it; training for a task is expected
                   to move away from W)

The init comes from the run's run.json (`init`, `config`); without one it is unknown and init_error is null.
A base loaded in full precision (quant "none") has no quantization error: the shares are null.
"""

from pathlib import Path

import torch

from minilora.adapted_model import resolve_trained
from minilora.errors import AdapterError, UserError
from minilora.lora import dequantize_weight, lora_scale
from minilora.lora_init import LOFTQ, ZEROS, changes_base, initial_factors, one_cpu_thread, parse_init, subtract_update
from minilora.quant import Quantizer, load_base
from minilora.run_record import read_run_record


def run_init(adapter_dir: Path) -> dict | None:
    """{"method", "r", "alpha", "use_rslora"} of the run that wrote the adapter (its run.json), or None."""
    from minilora.run_record import find_run_record

    path = find_run_record(adapter_dir)
    run = read_run_record(path.parent) if path is not None else None
    if run is None or not isinstance(run.get("config"), dict):
        return None
    cfg = run["config"]
    method = (run.get("init") or {}).get("method", cfg.get("init", ZEROS))
    return {"method": method, "r": cfg.get("r"), "alpha": cfg.get("alpha"), "use_rslora": bool(cfg.get("rslora"))}


def _fro(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def _share(error: float | None, quant_error: float) -> float | None:
    return None if error is None or quant_error == 0 else 1 - error / quant_error


@torch.no_grad()
def quant_errors(model: str, modules: dict[str, dict], adapter_dir: Path) -> dict[str, dict]:
    """Module name -> {"base_fro", "quant_error", "init_error", "trained_error", "init_cancelled",
    "trained_cancelled"}; `modules` as inspect.read_factors gives them (float64 A, B, scale)."""
    setup = resolve_trained(adapter_dir, model=model)
    device = torch.device("cpu")
    dtype = setup.compute_dtype or torch.float32
    full = load_base(setup.base, quant="none", compute_dtype=dtype, device=device)
    quantizer = Quantizer(setup.quant, setup.trained.double_quant, dtype, device) if setup.quant != "none" else None
    init = run_init(adapter_dir)
    rows = {}
    for name, m in modules.items():
        try:
            linear = full.get_submodule(name)
        except AttributeError as err:
            raise AdapterError(f"{adapter_dir}: module {name} is not a linear layer of {model}") from err
        shape = [m["B"].shape[0], m["A"].shape[1]]
        if list(linear.weight.shape) != shape:
            raise AdapterError(f"{adapter_dir}: {name} is {shape} in the adapter but {list(linear.weight.shape)} "
                               f"in {model}")
        if not torch.isfinite(linear.weight).all():  # every error would be NaN, and --json not JSON
            raise UserError(f"--model {model}: the weight of {name} holds NaN or inf values")
        with one_cpu_thread(device):
            rows[name] = _module_errors(linear, m, quantizer, init)
    return rows


def _module_errors(linear, m: dict, quantizer, init: dict | None) -> dict:
    w = linear.weight.data  # (out, in), the compute dtype
    deq = dequantize_weight(quantizer(linear)).float() if quantizer is not None else w.float()  # (out, in)
    w32 = w.float()
    norm_w = _fro(w32)
    quant_error = _fro(w32 - deq) / norm_w
    delta = m["scale"] * (m["B"].float() @ m["A"].float())  # (out, in), the saved update
    trained_error = _fro(w32 - deq - delta) / norm_w
    init_error = _init_error(linear, w32, deq, m, quantizer, init) / norm_w if init is not None else None
    return {"base_fro": _fro(deq), "quant_error": quant_error, "init_error": init_error,
            "trained_error": trained_error, "init_cancelled": _share(init_error, quant_error),
            "trained_cancelled": _share(trained_error, quant_error)}


def _init_error(linear, w32: torch.Tensor, deq: torch.Tensor, m: dict, quantizer, init: dict) -> float:
    """||W - W0||_F of the model the run started from (see the module docstring)."""
    method, _ = parse_init(init["method"])  # "loftq:4" -> loftq
    if method == ZEROS:
        return _fro(w32 - deq)
    r = init["r"]
    scale = lora_scale(init["alpha"], r, init["use_rslora"])
    if method == LOFTQ:
        if quantizer is None:
            return _fro(w32 - deq)
        # loftq's factors are not stored (its adapter is a plain LoRA): computed again, the same for `loftq`;
        # `loftq:N` draws a new randomized test matrix, so its init_error is that of an equal draw, not the run's.
        with torch.random.fork_rng(devices=[]):  # a fixed draw, and the caller's generator left as it was
            torch.manual_seed(0)
            a0, b0 = initial_factors(linear.weight.data, init["method"], r, scale, deq)
        return _fro(w32 - deq - scale * (b0 @ a0))
    if not changes_base(method) or m["A"].shape[0] != 2 * r:
        raise AdapterError(f"init {method!r} with rank {r}: the adapter (rank {m['A'].shape[0]}) is not its "
                           "converted rank-2r form")
    a0, b0 = m["A"][r:].float(), -m["B"][:, r:].float()  # the converted adapter's second halves
    residual = subtract_update(linear.weight.data, a0, b0, scale)
    base = dequantize_weight(quantizer(linear, residual)).float() if quantizer is not None else residual.float()
    return _fro(w32 - base - scale * (b0 @ a0))
