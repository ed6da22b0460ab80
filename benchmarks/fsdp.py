"""QLoRA under FSDP2: how much memory each GPU (and the host) needs, from a model config alone.

    python -m benchmarks.fsdp --plan --config benchmarks/configs/llama-2-70b.json --gpus 2 --gpu-gb 24 --offload
    python -m benchmarks.fsdp --plan --published    # the two published Llama-2-70B cases, written to results/

`--plan` prints the per-GPU table of benchmarks/fsdp_plan.py (NF4 weights and statistics, bf16 weights,
LoRA parameters, gradients and AdamW state, all-gather buffers, activations, loss, overhead) and whether it
fits, and with `--offload` the host memory. `--config` takes a model folder or its config.json: no weights
are read. `--published` plans the settings of Answer.AI's fsdp_qlora and PEFT's FSDP+QLoRA guide
(benchmarks/fsdp_published.py), prints each published figure beside the plan with the ratio, and writes
<date>-<device>-fsdp-plan.json and .md under benchmarks/results/.

    python -m benchmarks.fsdp --run --ranks 2 4              # train.py: 1 process vs DDP vs FSDP, on the CPU

`--run` trains a random Llama for a few steps with train.py under torchrun (benchmarks/fsdp_run.py) and writes
<date>-cpu-fsdp-run.json and .md: losses against one process, each rank's peak memory and 4-bit base bytes,
tokens/s, and the goals.
"""

import argparse
import sys
from pathlib import Path

from minilora.recipe import DEFAULT_R, DEFAULT_TARGETS

from .harness import RESULTS_DIR

LLAMA_2_70B = Path(__file__).resolve().parent / "configs" / "llama-2-70b.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fsdp", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan", action="store_true", help="compute the memory plan from the config (no GPU)")
    mode.add_argument("--run", action="store_true",
                      help="train on the CPU: 1 process vs DDP 2 ranks vs FSDP --ranks, and write the results")
    parser.add_argument("--config", default=str(LLAMA_2_70B),
                        help="model folder or config.json (default: Llama-2-70B's, shipped in benchmarks/configs)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs FSDP shards over")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU, GiB (a 24 GB card: 24)")
    parser.add_argument("--offload", action="store_true",
                        help="FSDP2 CPUOffloadPolicy: sharded parameters, gradients, optimizer state on the host")
    parser.add_argument("--batch-size", type=int, help="examples per micro-batch (and rank with --run); default: 4 "
                        "with --plan, 2 with --run")
    parser.add_argument("--seq-len", type=int, help="tokens per example; default: 2048 with --plan, 64 with --run")
    parser.add_argument("--recompute", default="full", choices=("full", "none"),
                        help="full: each decoder layer keeps only its input; none: everything kept")
    parser.add_argument("--r", type=int, default=DEFAULT_R, help="LoRA rank")
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                        help="LoRA target module names (minilora's matching: name or .name suffix)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (what it keeps counts)")
    parser.add_argument("--published", action="store_true",
                        help="plan the published Llama-2-70B cases, compare, and write results")
    run = parser.add_argument_group("--run")
    run.add_argument("--model-dir", help="where the random model is written (or found); default: a temporary folder")
    run.add_argument("--layers", type=int, default=40,
                     help="decoder layers of the random Llama (40: 1.1 B weights, ~10 min on 2 cores; 12: 0.40 B)")
    run.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    run.add_argument("--accum", type=int, default=4,
                     help="global micro-batches per step (each configuration's ranks x --grad-accum)")
    run.add_argument("--ranks", type=int, nargs="+", default=[2], help="FSDP rank counts (each divides --accum)")
    run.add_argument("--ddp-ranks", type=int, nargs="*", default=[2],
                     help="DDP rank counts (none: --ddp-ranks with no value, e.g. on one GPU)")
    run.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    return parser


def _settings(args):
    from .fsdp_plan import Settings, load_config

    return Settings(load_config(args.config), gpus=args.gpus, gpu_gib=args.gpu_gb, offload=args.offload,
                    batch_size=args.batch_size, seq_len=args.seq_len, recompute=args.recompute, r=args.r,
                    targets=tuple(args.targets), dropout=args.dropout)


def run_plan(args) -> None:
    from .fsdp_plan import describe, plan, table

    s = _settings(args)
    p = plan(s)
    print(f"{Path(args.config).name}: {describe(s)}; trainable {p.trainable:,} LoRA parameters")
    print(table(p))


def run_published(args) -> Path:
    from .fsdp_plan import describe, plan, table
    from .fsdp_published import NOTES, PUBLISHED, comparison_rows
    from .harness import write_results

    base = _settings(args)
    rows, sections = [], []
    for ref in PUBLISHED:
        s = ref.settings(base)
        p = plan(s)
        row = comparison_rows(ref, p)
        row.update(settings=describe(s), trainable=p.trainable, plan_gpu_gib={k: v / 2**30 for k, v in p.gpu.items()},
                   plan_host_gib_per_rank={k: v / 2**30 for k, v in p.host.items()})
        rows.append(row)
        extra = "\n".join(f"| reference only: {name} | {value:+.2f} |"
                          for name, value in row["reference_lines_gib"].items())
        sections.append(
            f"### {ref.name}\n\n{describe(s)}; trainable {p.trainable:,}. Published: {ref.gib} GiB per GPU "
            f"({ref.measured}), {ref.url}\n\n{table(p)}\n{extra}\n"
            f"| **plan + reference-only lines** | **{row['plan_with_reference_lines_gib']:.2f}** |\n\n"
            f"plan / published = {row['plan_gib']:.2f} / {ref.gib} = **{row['ratio']:.2f}**; "
            f"with the reference-only lines {row['plan_with_reference_lines_gib']:.2f} / {ref.gib} = "
            f"**{row['adjusted_ratio']:.2f}**\n")
        print(sections[-1])
    summary = ["| reference | published GiB | plan GiB | ratio | plan + reference lines | ratio |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
    summary += [f"| {r['reference']} | {r['published_gib']} | {r['plan_gib']:.2f} | {r['ratio']:.2f} | "
                f"{r['plan_with_reference_lines_gib']:.2f} | {r['adjusted_ratio']:.2f} |" for r in rows]
    markdown = ("# FSDP-QLoRA memory plan vs published Llama-2-70B figures (2 GPUs)\n\n" + "\n".join(summary)
                + f"\n\n{NOTES}\n\n" + "\n".join(sections))
    path = write_results("fsdp-plan", {"config": str(args.config), "comparisons": rows}, markdown)
    print("\n".join(summary))
    print(f"wrote {path} (+ .md)")
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.run:
        from .fsdp_run import run_benchmark

        args.batch_size, args.seq_len = args.batch_size or 2, args.seq_len or 64
        run_benchmark(args)
        return 0
    args.batch_size, args.seq_len = args.batch_size or 4, args.seq_len or 2048
    if args.published:
        run_published(args)
    else:
        run_plan(args)
    return 0


if __name__ == "__main__":
    from minilora.cli_runner import run_cli

    sys.exit(run_cli(main))
