"""Bar charts from a training-benchmark results file (benchmarks.throughput): tokens/s and peak memory per system.

    python -m benchmarks.plot_throughput benchmarks/results/<date>-<device>-train.json [more.json ...] [--out file.png]

One figure per file, written beside it as <stem>.png: left, training tokens/s (median, whiskers p20-p80);
right, peak memory (GPU: max allocated, with reserved marked; CPU: peak RSS). One group of bars per run
(model, sequence length, batch); each reference bar is labelled with ours / it. A system that did not
finish shows its status (OOM, skipped, ...) instead of a bar. Everything drawn is read from the file.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .throughput_setup import SYSTEMS  # noqa: E402

LABELS = {"ours": "minilora", "ref_loop": "HF+PEFT, reference loop", "trainer": "HF+PEFT, Trainer"}
COLORS = {"ours": "tab:green", "ref_loop": "tab:blue", "trainer": "tab:gray"}
WIDTH = 0.26


def memory_key(run: dict) -> tuple[str, str]:
    if run["device"] == "cuda":
        return "peak_allocated_mib", "peak GPU memory allocated, GiB (dash: reserved)"
    return "peak_rss_mib", "peak RSS while training, GiB"


def _bars(ax, results: dict, value, ratio_key: str, ylabel: str, errors=None, marker=None) -> None:
    runs = results["runs"]
    heights = [value(r, s) or 0 for r in runs for s in r["systems"].values()]
    if errors is not None:
        heights += [errors(s)[1] for r in runs for s in r["systems"].values() if value(r, s) is not None]
    if marker is not None:
        heights += [marker(r, s) or 0 for r in runs for s in r["systems"].values()]
    top = max(heights + [1e-9])
    labelled = set()
    for i, run in enumerate(runs):
        for j, name in enumerate(SYSTEMS):
            res = run["systems"].get(name)
            if res is None:
                continue
            x = i + (j - 1) * WIDTH
            v = value(run, res)
            if res.get("status") != "ok" or v is None:
                ax.text(x, top * 0.02, res.get("status", "?").split(" (")[0], rotation=90, ha="center",
                        va="bottom", fontsize=8, color=COLORS[name])
                continue
            yerr = None
            if errors is not None:
                low, high = errors(res)
                yerr = [[v - low], [high - v]]
            ax.bar(x, v, WIDTH, color=COLORS[name], yerr=yerr, capsize=3,
                   label=None if name in labelled else LABELS[name])
            labelled.add(name)
            if marker is not None and marker(run, res) is not None:
                ax.plot([x - WIDTH / 2, x + WIDTH / 2], [marker(run, res)] * 2, color="black", linewidth=1.5)
            ratio = run.get("ratios", {}).get(name, {}).get(ratio_key)
            if ratio is not None:  # inside the bar, clear of the whiskers
                ax.text(x, v * 0.5, f"ours / it\n{ratio:.2f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(runs)), [f"{r['model']}\nseq {r['seq']} x {r['batch']}, {r['precision']}" for r in runs])
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.5, len(runs) - 0.5)
    ax.set_ylim(0, top * 1.1)
    ax.grid(axis="y", alpha=0.3)


def plot(results: dict, path: Path) -> Path:
    env = results.get("environment") or results["env"]  # "env" in files written before benchmarks.harness
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    _bars(left, results, lambda run, r: r.get("tokens_per_s"), "tokens_per_s", "training tokens/s (median)",
          errors=lambda r: (r["tokens_per_s_p20"], r["tokens_per_s_p80"]))

    def memory(run, r):
        v = r.get(memory_key(run)[0])
        return None if v is None else v / 1024

    def reserved(run, r):
        v = r.get("peak_reserved_mib")
        return None if v is None else v / 1024

    _bars(right, results, memory, "peak_memory", memory_key(results["runs"][0])[1] if results["runs"] else "",
          marker=reserved)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=len(SYSTEMS), fontsize=8, frameon=False)
    fig.suptitle(f"{env['device_name']}: training benchmark, {env['date']}, commit {env['commit'][:12]}"
                 f"{' (dirty)' if env['commit'].endswith('+dirty') else ''}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="benchmarks.throughput results file(s) (.json)")
    p.add_argument("--out", type=Path, help="PNG path (only with a single results file; default <stem>.png)")
    args = p.parse_args(argv)
    if args.out and len(args.results) > 1:
        p.error("--out needs exactly one results file")
    for path in args.results:
        results = json.loads(path.read_text())
        written = plot(results, args.out or path.with_suffix(".png"))
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
