"""The run's plots: loss.png (training loss per step, held-out loss per evaluation) and, with
--log-lora-stats, lora_stats.png (per-module update and gradient norms)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from minilora.atomic import atomic_write  # noqa: E402
from minilora.training.metrics import METRICS_NAME, read_metrics  # noqa: E402


def plot_losses(metrics: list[dict], path: str | Path, title: str = "") -> None:
    train = [(m["step"], m["loss"]) for m in metrics if m.get("kind") == "train" and m.get("loss") is not None]
    evals = [(m["step"], m["loss"]) for m in metrics if m.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_run(output: str | Path, title: str) -> None:
    """loss.png in the run folder `output`, from its metrics.jsonl, and lora_stats.png where it has statistics."""
    metrics = read_metrics(Path(output) / METRICS_NAME)
    plot_losses(metrics, Path(output) / "loss.png", title)
    if any(m.get("kind") == "lora_stats" for m in metrics):
        plot_lora_stats(metrics, Path(output) / "lora_stats.png", title)


def plot_lora_stats(metrics: list[dict], path: str | Path, title: str = "") -> None:
    """Update norm and total gradient norm per module over the steps, one colour per module kind."""
    records = [m for m in metrics if m.get("kind") == "lora_stats"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    names = list(records[0]["modules"]) if records else []
    kinds = sorted({name.rpartition(".")[2] for name in names})
    colours = {kind: plt.get_cmap("tab10")(i % 10) for i, kind in enumerate(kinds)}
    steps = [r["step"] for r in records]
    for name in names:
        stats = [r["modules"].get(name, {}) for r in records]
        update = [s.get("update_norm") for s in stats]
        grad = [sum(v**2 for k, v in s.items() if k.startswith("grad_")) ** 0.5 for s in stats]
        colour = colours[name.rpartition(".")[2]]
        axes[0].plot(steps, update, color=colour, linewidth=0.8, alpha=0.7)
        axes[1].plot(steps, grad, color=colour, linewidth=0.8, alpha=0.7)
    for ax, label in zip(axes, ("update norm ||scale·BA||_F", "gradient norm (A, B, magnitude)"), strict=True):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log" if records else "linear")
    for kind, colour in colours.items():
        axes[0].plot([], [], color=colour, label=kind)
    if kinds:
        axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
