"""Look inside a LoRA adapter: what each update ΔW = scale · B A is, and how two adapters compare.

    python -m minilora.inspect out/a [--compare out/b] [--model BASE] [--json a.json] [--plot a.png]

Everything is computed from the factors in float64, never from the dense out x in matrix:

    B = Q_B R_B,  A^T = Q_A R_A  (thin QR)   ->   ΔW = Q_B (scale · R_B R_A^T) Q_A^T
    scale · R_B R_A^T = U_r S V_r^T  (SVD of an r x r matrix)   ->   ΔW = (Q_B U_r) S (Q_A V_r)^T

so S holds all r singular values of ΔW and Q_B U_r its left singular vectors, at O((out + in) r^2).

Per module: `delta_fro` = ||ΔW||_F = ||S||_2; `effective_rank` = exp(H(p)), p_i = σ_i / Σ_j σ_j
(the spectrum normalised to sum 1, Roy & Vetterli 2007, "The effective rank: a measure of effective
dimensionality"; between 1 and r); `stable_rank` = ||ΔW||_F^2 / ||ΔW||_2^2 = Σ σ_i^2 / σ_1^2;
`numerical_rank` = #{σ_i > σ_1 · max(out, in) · eps_fp32} (NumPy's matrix_rank tolerance, with the
float32 epsilon of the stored factors). A zero update (B = 0) has all three at 0.
With a base model: `base_fro` = ||W||_F of the dequantized base weight and `relative_norm` = ||ΔW||_F / ||W||_F,
and the quantization error of the base and the share of it the initial and trained updates cancel
(`quant_error`, `init_error`, `trained_error`, `init_cancelled`, `trained_cancelled`: inspect_quant.py).
For a DoRA adapter these numbers describe the directional update scale · B A; `magnitude_vector`
gives the mean and spread of the learned row magnitudes.

Comparing two adapters module by module: `cosine` = <ΔW1, ΔW2>_F / (||ΔW1||_F ||ΔW2||_F), with
<B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T)) (r x r products only); `subspace_similarity` =
||U1_k^T U2_k||_F^2 / k over the top-k left singular vectors, k = the smaller numerical rank (the LoRA
paper's measure, Hu et al. 2021, section 7): 1 when the top-k column spaces coincide, k'/k when
they share k' directions, about k/out for random subspaces.
"""

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from minilora.adapter import PREFIX, WEIGHTS_NAME, read_adapter_config, read_adapter_weights
from minilora.atomic import atomic_write_json
from minilora.errors import AdapterError, UserError
from minilora.training.cli import run_cli

FACTOR_KEY = re.compile(r"^(?P<name>.+)\.(?P<part>lora_A|lora_B)\.weight$")
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
EPS_FP32 = torch.finfo(torch.float32).eps


def _scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_factors(folder: str | Path) -> tuple[dict, dict[str, dict]]:
    """(adapter config, module name -> {"A": [r, in], "B": [out, r], "scale", "magnitude" or None})."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    tensors = read_adapter_weights(folder)
    scale = _scale(config)
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(MAGNITUDE_SUFFIX):
            modules.setdefault(name.removesuffix(MAGNITUDE_SUFFIX), {})["magnitude"] = value
            continue
        match = FACTOR_KEY.match(name)
        if match is None:
            raise AdapterError(f"{folder / WEIGHTS_NAME}: key {key!r} is not a LoRA factor")
        modules.setdefault(match["name"], {})[match["part"][-1]] = value
    for name, m in modules.items():
        a, b = m.get("A"), m.get("B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{folder / WEIGHTS_NAME}: {name} needs lora_A [r, in] and lora_B [out, r] "
                               f"(found A {None if a is None else list(a.shape)}, "
                               f"B {None if b is None else list(b.shape)})")
        m.update(A=a.double(), B=b.double(), scale=scale)
        m.setdefault("magnitude", None)
    if not modules:
        raise AdapterError(f"{folder / WEIGHTS_NAME}: holds no LoRA weights")
    return config, modules


def update_svd(a: torch.Tensor, b: torch.Tensor, scale: float,
               vectors: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(singular values [r] descending, left singular vectors [out, r] or None) of scale · b @ a,
    from the factors. Q_A is never needed, and Q_B only for the vectors (`mode="r"` skips forming them)."""
    r_a = torch.linalg.qr(a.T, mode="r").R  # (r, r)
    if not vectors:
        return torch.linalg.svdvals(scale * torch.linalg.qr(b, mode="r").R @ r_a.T), None
    q_b, r_b = torch.linalg.qr(b)  # (out, r), (r, r)
    u_small, s, _ = torch.linalg.svd(scale * r_b @ r_a.T)  # r x r
    return s, q_b @ u_small


def module_svd(m: dict, vectors: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """update_svd of a module from read_factors, kept in the module's dict: a comparison and the
    report share one decomposition."""
    cached = m.get("svd")
    if cached is None or (vectors and cached[1] is None):
        m["svd"] = cached = update_svd(m["A"], m["B"], m["scale"], vectors)
    return cached


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > s[0] * max(shape) * EPS_FP32).sum())


def spectrum_stats(s: torch.Tensor) -> dict:
    """delta_fro, effective_rank (Roy & Vetterli), stable_rank of a spectrum `s` (descending)."""
    total = float(s.sum())
    if total <= 0:
        return {"delta_fro": 0.0, "effective_rank": 0.0, "stable_rank": 0.0}
    p = s / total
    p = p[p > 0]  # 0 · log 0 = 0
    return {"delta_fro": float(s.norm()), "effective_rank": float(torch.exp(-(p * p.log()).sum())),
            "stable_rank": float((s**2).sum() / s[0] ** 2)}


def module_report(name: str, m: dict) -> dict:
    s, _ = module_svd(m, vectors=False)
    out_f, in_f = m["B"].shape[0], m["A"].shape[1]
    row = {"name": name, "rank": m["A"].shape[0], "shape": [out_f, in_f], **spectrum_stats(s),
           "singular_values": s.tolist(), "numerical_rank": numerical_rank(s, (out_f, in_f))}
    if m["magnitude"] is not None:
        mag = m["magnitude"].double()
        row["magnitude_vector"] = {"mean": float(mag.mean()), "std": float(mag.std())}
    return row


def _inspect_factors(folder: str | Path, config: dict, modules: dict[str, dict], model: str | None) -> dict:
    rows = [module_report(name, m) for name, m in sorted(modules.items())]
    if model is not None:
        from minilora.inspect_quant import quant_errors

        errors = quant_errors(model, modules, Path(folder))
        for row in rows:
            row.update(errors[row["name"]])
            base = row["base_fro"]
            row["relative_norm"] = row["delta_fro"] / base if base else None
    summary = {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora", "base_model_name_or_path")}
    return {"adapter": str(folder), "config": summary, "modules": rows}


def frobenius_inner(m1: dict, m2: dict) -> float:
    """<s1 B1 A1, s2 B2 A2>_F = s1 s2 trace((B1^T B2)(A2 A1^T)), from r x r products."""
    return m1["scale"] * m2["scale"] * float(torch.trace((m1["B"].T @ m2["B"]) @ (m2["A"] @ m1["A"].T)))


def compare_modules(name: str, m1: dict, m2: dict) -> dict:
    (s1, u1), (s2, u2) = module_svd(m1, vectors=True), module_svd(m2, vectors=True)
    shape = (m1["B"].shape[0], m1["A"].shape[1])
    norms = float(s1.norm()) * float(s2.norm())
    k = min(numerical_rank(s1, shape), numerical_rank(s2, shape))
    subspace = float((u1[:, :k].T @ u2[:, :k]).pow(2).sum() / k) if k else None
    return {"name": name, "cosine": frobenius_inner(m1, m2) / norms if norms else None,
            "subspace_similarity": subspace, "k": k}


def compare_adapters(folder1: str | Path, folder2: str | Path) -> dict:
    """{"modules": [{"name", "cosine", "subspace_similarity", "k"}]}; the adapters must adapt the same
    modules with the same shapes (their ranks may differ)."""
    return _compare_factors(folder1, read_factors(folder1)[1], folder2, read_factors(folder2)[1])


def _compare_factors(folder1: str | Path, mods1: dict[str, dict], folder2: str | Path, mods2: dict[str, dict]) -> dict:
    only = sorted(set(mods1) ^ set(mods2))
    if only:
        where = folder1 if only[0] in mods1 else folder2
        raise AdapterError(f"--compare: module {only[0]} is only in {where} ({len(only)} modules differ)")
    for name in sorted(mods1):
        shape1 = (mods1[name]["B"].shape[0], mods1[name]["A"].shape[1])
        shape2 = (mods2[name]["B"].shape[0], mods2[name]["A"].shape[1])
        if shape1 != shape2:
            raise AdapterError(f"--compare: {name} is {list(shape1)} in {folder1} but {list(shape2)} in {folder2}")
    return {"modules": [compare_modules(name, mods1[name], mods2[name]) for name in sorted(mods1)]}


def inspect(folder: str | Path, compare: str | Path | None = None, model: str | None = None) -> dict:
    """The whole report as plain dicts: `modules`, and `compare` when a second adapter is given."""
    config, modules = read_factors(folder)
    # The comparison first: mismatched adapters are refused before a base model is loaded.
    compared = _compare_factors(folder, modules, compare, read_factors(compare)[1]) if compare is not None else None
    report = _inspect_factors(folder, config, modules, model)
    if compared is not None:
        report["compare"] = compared
    return report


# --- command line -----------------------------------------------------------------------------------


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def format_table(report: dict) -> str:
    """One row per module, the ones that moved most (relative to the base if known) first."""
    compared = {row["name"]: row for row in report.get("compare", {}).get("modules", [])}
    has_base = any("relative_norm" in row for row in report["modules"])
    key = "relative_norm" if has_base else "delta_fro"
    rows = sorted(report["modules"], key=lambda row: -(row.get(key) or 0.0))
    header = ["module", "r", "|dW|_F"] + (["|dW|/|W|"] if has_base else []) + ["sigma_1", "eff.rank", "stable"]
    header += ["q.err", "init", "trained"] if has_base else []
    if compared:
        header += ["cosine", "subspace"]
    lines = [header]
    for row in rows:
        sigma_1 = row["singular_values"][0] if row["singular_values"] else None
        line = [row["name"], str(row["rank"]), _num(row["delta_fro"])]
        line += [_num(row.get("relative_norm"))] if has_base else []
        line += [_num(sigma_1), _num(row["effective_rank"], 3), _num(row["stable_rank"], 3)]
        if has_base:
            line += [_num(row["quant_error"], 3), _num(row["init_error"], 3), _num(row["trained_error"], 3)]
        if compared:
            other = compared[row["name"]]
            line += [_num(other["cosine"], 3), _num(other["subspace_similarity"], 3)]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths, strict=True))) for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minilora.inspect",
        description="Per-module spectra of a LoRA adapter's updates (scale * B @ A), optionally compared "
                    "with a second adapter; computed from the factors, no model needed.",
    )
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--compare", metavar="ADAPTER2", help="second adapter: cosine and subspace similarity")
    parser.add_argument("--model", help="base model: adds each update's norm relative to the dequantized "
                                        "base weight's, the base's relative quantization error and how much of "
                                        "it the initial and trained updates cancel (loads the base)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG heatmap (layers x module types)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("json", "plot"):
        target = getattr(args, flag)
        if target and not Path(target).resolve().parent.is_dir():
            raise UserError(f"--{flag} {target}: its folder does not exist")
        if target and Path(target).is_dir():
            raise UserError(f"--{flag} {target}: is a folder; give a file name")
    report = inspect(args.adapter, compare=args.compare, model=args.model)
    print(format_table(report))
    if args.json:
        atomic_write_json(Path(args.json), report)
        print(f"wrote {args.json}")
    if args.plot:
        from minilora.inspect_plot import plot_report

        for written in plot_report(report, args.plot):
            print(f"wrote {written}")
    return 0


def cli() -> None:
    """Console entry point: user errors become one `error:` line and exit code 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
