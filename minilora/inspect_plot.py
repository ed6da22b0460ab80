"""The inspector's PNGs: two heatmaps, layers x module types, of the update norm and the effective rank; with a
base model a second file beside it (`<name>-quant.png`) of the relative quantization error and the share
of it the initial and trained updates cancel."""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from minilora.atomic import atomic_write  # noqa: E402

LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_and_kind(name: str) -> tuple[int, str]:
    """("model.layers.3.self_attn.qkv_proj") -> (3, "qkv_proj"); modules outside a layer stack get -1."""
    match = LAYER_INDEX.search(name)
    return (int(match[1]) if match else -1), name.rpartition(".")[2]


def grid(modules: list[dict], key: str) -> tuple[np.ndarray, list[int], list[str]]:
    """(values [layers, kinds] with NaN where a layer lacks a kind, layer indices, kinds)."""
    placed = {layer_and_kind(m["name"]): m.get(key) for m in modules}
    layers = sorted({layer for layer, _ in placed})
    kinds = sorted({kind for _, kind in placed})
    values = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), value in placed.items():
        if value is not None:
            values[layers.index(layer), kinds.index(kind)] = value
    return values, layers, kinds


def heatmaps(modules: list[dict], panels: list[tuple[str, str, str]], title: str, path: str | Path,
             limits: dict[str, tuple[float, float]] | None = None) -> None:
    """One heatmap per (key, title, colormap) panel, layers x module types, written to `path`."""
    _, layers, kinds = grid(modules, panels[0][0])
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + (1.5 + 1.4 * len(kinds)) * len(panels) / 2,
                                                      1.5 + 0.22 * len(layers)), dpi=110)
    for ax, (key, panel_title, cmap) in zip(axes, panels, strict=True):
        values, _, _ = grid(modules, key)
        vmin, vmax = (limits or {}).get(key, (None, None))
        image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
        ax.set_yticks(range(len(layers)), [str(i) if i >= 0 else "-" for i in layers])
        ax.set_ylabel("layer")
        ax.set_title(panel_title)
        fig.colorbar(image, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def quant_plot_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}-quant{path.suffix or '.png'}")


def plot_report(report: dict, path: str | Path) -> list[Path]:
    """Write the heatmaps; returns the files written (the second only when the report has a base)."""
    modules = report["modules"]
    title = Path(report["adapter"]).name or report["adapter"]
    norm_key = "relative_norm" if any("relative_norm" in m for m in modules) else "delta_fro"
    heatmaps(modules, [(norm_key, "||ΔW||_F / ||W||_F" if norm_key == "relative_norm" else "||ΔW||_F", "viridis"),
                       ("effective_rank", "effective rank", "magma")], title, path)
    if not any("quant_error" in m for m in modules):
        return [Path(path)]
    # The shares on one fixed scale, so two adapters' plots compare at a glance; 1 = all of the error cancelled.
    shares = {"init_cancelled": (-1.0, 1.0), "trained_cancelled": (-1.0, 1.0)}
    heatmaps(modules, [("quant_error", "||W - deq(Q)||_F / ||W||_F", "viridis"),
                       ("init_cancelled", "share cancelled at init", "RdBu"),
                       ("trained_cancelled", "share cancelled after training", "RdBu")],
             title, quant_plot_path(path), limits=shares)
    return [Path(path), quant_plot_path(path)]
