"""The inspector's PNG: two heatmaps, layers x module types, of the update norm and the effective rank."""

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


def plot_report(report: dict, path: str | Path) -> None:
    modules = report["modules"]
    norm_key = "relative_norm" if any("relative_norm" in m for m in modules) else "delta_fro"
    panels = [(norm_key, "||ΔW||_F / ||W||_F" if norm_key == "relative_norm" else "||ΔW||_F", "viridis"),
              ("effective_rank", "effective rank", "magma")]
    _, layers, kinds = grid(modules, norm_key)
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.4 * len(kinds), 1.5 + 0.22 * len(layers)), dpi=110)
    for ax, (key, title, cmap) in zip(axes, panels, strict=True):
        values, _, _ = grid(modules, key)
        image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
        ax.set_yticks(range(len(layers)), [str(i) if i >= 0 else "-" for i in layers])
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.suptitle(Path(report["adapter"]).name or report["adapter"])
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
