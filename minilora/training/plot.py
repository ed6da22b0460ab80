"""loss.png: training loss per optimizer step and held-out loss at each evaluation."""

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
    """loss.png in the run folder `output`, from its metrics.jsonl."""
    plot_losses(read_metrics(Path(output) / METRICS_NAME), Path(output) / "loss.png", title)
