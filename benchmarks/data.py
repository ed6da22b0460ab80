"""Data preparation at scale: minilora's cached token store against the `datasets` map path.

    python -m benchmarks.data            # 100,000 generated alpaca lines (about 65 MB)
    python -m benchmarks.data --quick    # 5,000 lines

Both sides read the same generated file with the same tokenizer (the built-in byte-level one, with its
Phi-3 chat template) and truncate to --seq-len 1024:
  - ours, cold: `train.py --max-steps 1 --eval-fraction 0` with an empty data cache: prepare, load the
    model, one optimizer step; warm: the same with a fresh --output and the cache filled;
  - datasets: `load_dataset("json")` + chat template + tokenize in `map(num_proc=2)` with its Arrow
    cache on disk (preparation only, no model, no step);
  - ours under `torchrun --nproc_per_node 2`, cold.
Each run is a fresh process tree, run from the same state three times alone for its wall time (the
median is kept), then once sampled for its memory: reading the smaps of a torch process tree every
100 ms takes about a fifth of this 2-core machine and slowed the runs it measured by 10-20% (the
results give both times). Its memory is the peak over time of the PSS
summed over the tree (/proc/<pid>/smaps), so pages that processes share (a mapped token store, forked
workers) count once; it is also given without the pages of shared libraries (see `_pss_kb`).
"Data memory" is a run's peak without shared libraries minus the same run on a 200-line file made of
lines of the big file chosen so that its first training step (on one rank and on two) trains on the
same examples in the same layout as the big file's: the step's activations, which vary by hundreds of
MB with the length of its examples, are then the same in both runs and cancel, and the difference is
what the data costs. It is read twice: at the run's peak (the first step's), and over the data phase,
up to train.py's first `data:` line (printed once every rank holds its data, before the model loads),
where the preparation's workers hold what they hold. The two-rank goal compares the data phases: at the
peak the data adds too little to either run for a ratio of the two differences to resolve.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 1024
# Runs timed alone per measurement, the median kept: one run's wall time varies by ~10% on this machine.
TIMED_RUNS = 3
WORDS = ("the model data a of to and in is for that with on as this be by it are from or an which can at have more "
         "one but not will these their also has they use each other how when what time first new two may into some "
         "than its only such used most make like between over both example through where system number value "
         "function result process question answer write explain describe list give summarize").split()


def generate(path: Path, n: int, seed: int = 0) -> None:
    """Alpaca records with long-tailed (log-normal) lengths: median ~300 characters of output, a few 10k."""
    rng = random.Random(seed)

    def text(median: int, sigma: float, cap: int) -> str:
        n_words = max(1, min(cap, int(rng.lognormvariate(0, sigma) * median)))
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            record = {"instruction": text(14, 0.6, 200), "input": text(20, 1.0, 600) if rng.random() < 0.4 else "",
                      "output": text(60, 1.0, 2000)}
            f.write(json.dumps(record) + "\n")


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


_HEX = frozenset("0123456789abcdef")


def _pss_kb(pid: int) -> tuple[int, int]:
    """(PSS, PSS outside shared libraries) of one process, in KiB.

    The second leaves out the pages of mapped `.so` files and the interpreter: on a machine where other
    Python/torch processes run, their share of those pages changes with every process that starts or
    ends, which would drown the data's memory. Anonymous memory and mapped data files (a token store,
    an Arrow cache) stay in."""
    total = data = 0
    shared_lib = False
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0, 0
    # Parsed lightly: sampling every 100 ms must not take the CPU from the runs it measures. A mapping's
    # header starts with its address (a hex digit), its fields with a capital letter.
    for line in text.split("\n"):
        if line.startswith("Pss:"):
            kb = int(line[4:].split()[0])
            total += kb
            data += 0 if shared_lib else kb
        elif line[:1] in _HEX:
            fields = line.split(maxsplit=5)
            path = fields[5] if len(fields) == 6 else ""
            shared_lib = ".so" in path or "/bin/python" in path
    return total, data


# train.py's first report once every rank holds its data (before the model loads): the end of the data phase.
DATA_READY = "\ndata: "


def measure(cmd: list[str], log: Path, env: dict | None = None, sample: bool = True) -> dict:
    """Run `cmd` to completion: wall time, peak PSS summed over its process tree, exit code; and the peak
    (without shared libraries) of the data phase, up to the DATA_READY line in its output (the whole run
    for a command that never prints it). With `sample` False, only the wall time and exit code: nothing
    else runs beside it."""
    started = time.perf_counter()
    with open(log, "w") as out:
        # Unbuffered, so that the DATA_READY line is in the log when it is printed.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        peak = peak_data = peak_phase = 0
        in_data_phase = True
        if not sample:
            proc.wait()
        while proc.poll() is None:
            sizes = [_pss_kb(pid) for pid in _tree(proc.pid)]
            peak = max(peak, sum(total for total, _ in sizes))
            peak_data = max(peak_data, sum(data for _, data in sizes))
            if in_data_phase:
                peak_phase = max(peak_phase, sum(data for _, data in sizes))
                in_data_phase = DATA_READY not in "\n" + log.read_text(errors="replace")
            time.sleep(0.1)
    result = {"wall_s": round(time.perf_counter() - started, 2), "peak_pss_mb": round(peak / 1024, 1),
              "peak_pss_no_libs_mb": round(peak_data / 1024, 1),
              "data_phase_peak_no_libs_mb": round(peak_phase / 1024, 1), "exit_code": proc.returncode}
    text = log.read_text()
    # What the run says its data took: preparing (cold) or finding and checking the cache (warm).
    found = re.search(r"data: (?:prepared .* in|cached .*checked in) ([\d.]+) s", text)
    if found:
        result["data_s"] = float(found.group(1))
    if proc.returncode != 0:
        result["error"] = text[-2000:]
    return result


def train_args(data: Path, cache: Path, output: Path) -> list[str]:
    return ["--data", str(data), "--model", "builtin:tiny-phi3", "--max-steps", "1", "--eval-fraction", "0",
            "--seq-len", str(SEQ_LEN), "--batch-size", "4", "--grad-accum", "1", "--data-cache", str(cache),
            "--output", str(output)]


def ours(data: Path, cache: Path, output: Path, ranks: int = 1) -> list[str]:
    args = ["train.py", *train_args(data, cache, output)]
    if ranks == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
            str(29500 + random.Random().randrange(1000)), *args]


def first_step(data: Path, cache: Path, world: int):
    """The first global micro-batch the benchmark's training command builds on `data` with `world` ranks,
    through the job's own data path (the store in `cache`, prepared there if missing)."""
    from minilora.data.dataset import load_dataset, split_eval
    from minilora.quant import load_tokenizer
    from minilora.training.cli import parse_config
    from minilora.training.loop import epoch_batches

    cfg = parse_config(train_args(data, cache, Path("unused")))
    tokenizer = load_tokenizer(cfg.model)
    dataset = load_dataset(data, tokenizer, cfg.seq_len, cfg.skip_bad_lines, cache_dir=cache)
    train, _ = split_eval(dataset.examples, cfg.eval_fraction, cfg.seed, cfg.eval_max_examples)
    return dataset, cfg, epoch_batches(train, cfg, 0, tokenizer.pad_token_id, world)[0]


def write_baseline(big: Path, cache: Path, small: Path, n: int) -> dict:
    """Write `small`: `n` lines of `big` placed so that the training command's first step on it, on one
    rank and on two, trains on exactly the examples (same tokens, same rows) of its first step on `big`.
    Checked by building both steps; returns the step's shape."""
    from minilora.data.batching import epoch_order

    dataset, cfg, step = first_step(big, cache, world=2)
    first_lines = [line for row in step.lines for line in row]
    others = [int(line) for line in dataset.examples.lines if int(line) not in set(first_lines)]
    chosen: list = [None] * n
    for slot, line in zip(epoch_order(n, 0, cfg.seed), first_lines, strict=False):
        chosen[slot] = line
    filler = iter(others)
    chosen = [line if line is not None else next(filler) for line in chosen]
    wanted = set(chosen)
    texts = {}
    with open(big, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno in wanted:
                texts[lineno] = line
    small.write_bytes(b"".join(texts[line] for line in chosen))
    for world in (1, 2):
        _, _, big_step = first_step(big, cache, world)
        _, _, small_step = first_step(small, cache, world)
        same = all(getattr(big_step, name).equal(getattr(small_step, name))
                   for name in ("input_ids", "labels", "position_ids"))
        if not same:
            raise RuntimeError(f"the baseline file's first step differs from the big file's ({world} ranks)")
    return {"first_step_rows": list(step.row_tokens), "first_step_lines": [list(row) for row in step.lines]}


def datasets_path(data: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.data", "--datasets-run", str(data), str(cache)]


def run_datasets(data: str, cache: str) -> None:
    """The HF-stack preparation a user would write: JSON loader, chat template, tokenize in map(num_proc=2)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from minilora.builtin import resolve_builtin

    tokenizer = AutoTokenizer.from_pretrained(resolve_builtin("tiny-phi3"))

    def tokenize(batch):
        texts = []
        for instruction, given, output in zip(batch["instruction"], batch["input"], batch["output"], strict=True):
            user = instruction + (f"\n\n{given}" if given else "")
            texts.append(tokenizer.apply_chat_template([{"role": "user", "content": user},
                                                        {"role": "assistant", "content": output}], tokenize=False))
        return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=SEQ_LEN)

    ds = load_dataset("json", data_files=data, split="train", cache_dir=cache)
    ds = ds.map(tokenize, batched=True, num_proc=2, remove_columns=ds.column_names)
    print(f"datasets: {len(ds)} examples, {sum(len(x) for x in ds['input_ids']):,} tokens")


def tokenizer_seconds(data: Path) -> float:
    """CPU seconds the Rust tokenizer alone takes for the file's rendered texts on one thread, in batches
    of the preparation's chunk size: the part of the preparation no Python code around it can remove."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from minilora.data.prepare import CHUNK_LINES
    from minilora.data.tokenize import Encoder, _marked_render, alpaca_messages
    from minilora.quant import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny-phi3")
    encoder = Encoder(tokenizer, "alpaca")
    with open(data, encoding="utf-8") as f:
        texts = [_marked_render(tokenizer, alpaca_messages(json.loads(line)), encoder.skeletons)[0] for line in f]
    started = time.process_time()
    for i in range(0, len(texts), CHUNK_LINES):
        encoder.backend.encode_batch_fast(texts[i : i + CHUNK_LINES], add_special_tokens=False)
    return round(time.process_time() - started, 2)


def _tokens(output: Path) -> int:
    return json.loads((output / "run.json").read_text())["data"]["n_train_tokens"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 lines instead of 100,000")
    parser.add_argument("--lines", type=int, default=None, help="lines in the generated file")
    parser.add_argument("--no-write", action="store_true", help="print the results, write no results file")
    parser.add_argument("--out", type=Path, default=None, help="folder for the results (default benchmarks/results)")
    parser.add_argument("--timed-runs", type=int, default=TIMED_RUNS,
                        help="runs timed alone per measurement (the median is kept)")
    parser.add_argument("--datasets-run", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-run", metavar="DATA", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.datasets_run:
        run_datasets(*args.datasets_run)
        return 0
    if args.tokenizer_run:
        print(json.dumps({"tokenizer_cpu_s": tokenizer_seconds(Path(args.tokenizer_run))}))
        return 0
    from benchmarks.harness import RESULTS_DIR, environment, write_results

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    n_lines = args.lines or (5_000 if args.quick else 100_000)
    env = environment("cpu")
    work = Path(tempfile.mkdtemp(prefix="minilora-bench-data-"))
    try:
        big, small = work / "big.jsonl", work / "small.jsonl"
        generate(big, n_lines)
        runs = {}

        def run(name: str, cmd: list[str], fresh: list[Path]) -> dict:
            """From the same state each time (the `fresh` folders removed): --timed-runs runs timed alone
            (the median's wall and data times are kept), then one sampled for memory. Reading a torch
            process's smaps every 100 ms takes about a fifth of this 2-core machine, which would slow a
            timed run by the share it takes from it."""
            results = []
            for sample in [False] * args.timed_runs + [True]:
                for folder in fresh:
                    shutil.rmtree(folder, ignore_errors=True)
                results.append(measure(cmd, work / f"{name}.log", sample=sample))
            *timed, sampled = results
            median = sorted(timed, key=lambda r: r["wall_s"])[len(timed) // 2]
            runs[name] = {**sampled, "wall_s": median["wall_s"], "timed_walls_s": [r["wall_s"] for r in timed],
                          "sampled_wall_s": sampled["wall_s"],
                          **({"data_s": median["data_s"]} if "data_s" in median else {})}
            print(f"{name:>18}: {runs[name]}", flush=True)
            return runs[name]

        # The big file's cold run first: the baseline file is chosen from the store it leaves.
        run("ours_cold_big", ours(big, work / "cache-big", work / "out-cold-big"),
            [work / "cache-big", work / "out-cold-big"])
        baseline = write_baseline(big, work / "cache-big", small, 200)
        print(f"baseline: {baseline}", flush=True)
        for size, data in (("small", small), ("big", big)):
            cache = work / f"cache-{size}"
            if size == "small":
                run("ours_cold_small", ours(data, cache, work / "out-cold-small"), [cache, work / "out-cold-small"])
            run(f"ours_warm_{size}", ours(data, cache, work / f"out-warm-{size}"), [work / f"out-warm-{size}"])
            run(f"datasets_{size}", datasets_path(data, str(work / f"hf-{size}")), [work / f"hf-{size}"])
            run(f"ours_2ranks_{size}", ours(data, work / f"cache2-{size}", work / f"out-ddp-{size}", ranks=2),
                [work / f"cache2-{size}", work / f"out-ddp-{size}"])
        runs = {f"{kind}_{size}": runs[f"{kind}_{size}"] for size in ("small", "big")
                for kind in ("ours_cold", "ours_warm", "datasets", "ours_2ranks")}
        tokens = _tokens(work / "out-cold-big")
        # In a process of its own, as the runs: nothing of this one's imports or heap in its way.
        floor = json.loads(subprocess.run([sys.executable, "-m", "benchmarks.data", "--tokenizer-run", str(big)],
                                          cwd=ROOT, check=True, capture_output=True, text=True).stdout)
        payload = summarize(runs, tokens, n_lines, big.stat().st_size, floor["tokenizer_cpu_s"])
        payload["baseline"] = baseline
        payload["environment"] = env
        payload["load_avg_end"] = list(os.getloadavg())
        print(json.dumps(payload["summary"], indent=1))
        if not args.no_write:
            name = "data-quick" if args.quick else "data"
            print(f"results: {write_results(name, payload, render(payload), out_dir=args.out or RESULTS_DIR)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def summarize(runs: dict, tokens: int, n_lines: int, n_bytes: int, tokenizer_cpu_s: float | None = None) -> dict:
    def data_mb(name: str, key: str = "peak_pss_no_libs_mb") -> float:
        return runs[f"{name}_big"][key] - runs[f"{name}_small"][key]

    def phase_mb(name: str) -> float:
        return data_mb(name, "data_phase_peak_no_libs_mb")

    def per_token(mb: float) -> float:
        return round(mb * 2**20 / tokens, 2)

    cold, warm, hf = runs["ours_cold_big"], runs["ours_warm_big"], runs["datasets_big"]
    startup = runs["ours_warm_small"]["wall_s"]  # interpreter, imports, model load, one step: no data to speak of
    summary = {
        "lines": n_lines, "file_mb": round(n_bytes / 2**20, 1), "tokens": tokens,
        "cold_s": cold["wall_s"], "datasets_s": hf["wall_s"],
        "cold_over_datasets": round(cold["wall_s"] / hf["wall_s"], 3),
        "cold_peak_mb": cold["peak_pss_mb"], "datasets_peak_mb": hf["peak_pss_mb"],
        "data_bytes_per_token": per_token(data_mb("ours_cold")),
        "data_phase_bytes_per_token": per_token(phase_mb("ours_cold")),
        "warm_data_bytes_per_token": per_token(data_mb("ours_warm")),
        "warm_data_phase_bytes_per_token": per_token(phase_mb("ours_warm")),
        "datasets_data_bytes_per_token": per_token(data_mb("datasets")),
        "warm_s": warm["wall_s"], "startup_s": startup,
        "warm_over_cold_beyond_startup": round((warm["wall_s"] - startup) / cold["wall_s"], 3),
        "cold_prepare_s": cold.get("data_s"), "warm_data_s": warm.get("data_s"),
        "warm_data_over_cold": round(warm.get("data_s", float("nan")) / cold["wall_s"], 4),
        "two_ranks_data_mb": round(data_mb("ours_2ranks"), 1), "one_rank_data_mb": round(data_mb("ours_cold"), 1),
        "two_ranks_data_phase_mb": round(phase_mb("ours_2ranks"), 1),
        "one_rank_data_phase_mb": round(phase_mb("ours_cold"), 1),
        "two_over_one_rank": round(phase_mb("ours_2ranks") / max(phase_mb("ours_cold"), 1e-9), 3),
        "two_ranks_s": runs["ours_2ranks_big"]["wall_s"],
        # A cold run whose preparation added nothing to the tokenizer's own work, spread over every core
        # after the start-up: how far the preparation's code around the tokenizer could still go.
        "tokenizer_cpu_s": tokenizer_cpu_s,
        "cold_floor_over_datasets": (round((startup + tokenizer_cpu_s / os.cpu_count()) / hf["wall_s"], 3)
                                     if tokenizer_cpu_s is not None else None),
    }
    goals = {
        "cold <= 0.5x datasets time": summary["cold_over_datasets"] <= 0.5,
        "cold peak memory <= datasets'": cold["peak_pss_mb"] <= hf["peak_pss_mb"],
        # Both readings: at the run's peak (the first step's, the same in both runs) and over the data phase,
        # where preparation's workers add what they hold.
        "data memory <= 4 bytes/token": max(summary["data_bytes_per_token"],
                                            summary["data_phase_bytes_per_token"]) <= 4,
        "warm start's data time < 10% of cold": summary["warm_data_over_cold"] < 0.10,
        # Over the data phase, where what each rank holds is far above the sampling noise; at the run's peak
        # the data adds too little to both runs for a ratio to mean anything. No verdict without a difference.
        "2 ranks' data memory <= 1.3x one rank's": (
            summary["two_over_one_rank"] <= 1.3 if phase_mb("ours_cold") > 0 else None),
    }
    return {"summary": summary, "goals": goals, "runs": runs}


def baseline_rows(payload: dict) -> str:
    return " + ".join(str(n) for n in payload.get("baseline", {}).get("first_step_rows", [])) or "?"


def render(payload: dict) -> str:
    s, env = payload["summary"], payload["environment"]
    lines = [
        "# Data preparation: minilora's token store vs the `datasets` map path",
        "",
        f"{s['lines']:,} generated alpaca lines ({s['file_mb']} MB, {s['tokens']:,} tokens kept at --seq-len "
        f"{SEQ_LEN}), built-in byte-level tokenizer; commit {env['commit'][:12]}, {env['date']}, "
        f"{env['cpu_count']} CPUs, load average {env['load_avg'][0]:.1f} at start, "
        f"{payload['load_avg_end'][0]:.1f} at end.",
        "",
        "| run | wall s | wall s while sampled | peak PSS MB | without shared libraries | data phase, without "
        "shared libraries |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {r['wall_s']} | {r.get('sampled_wall_s', '')} | {r['peak_pss_mb']} | "
          f"{r['peak_pss_no_libs_mb']} | {r['data_phase_peak_no_libs_mb']} |" for name, r in payload["runs"].items()),
        "",
        f"- cold (prepare + model load + one step) / datasets (prepare only): {s['cold_over_datasets']}",
        f"- data memory at the run's peak: {s['data_bytes_per_token']} bytes/token cold, "
        f"{s['warm_data_bytes_per_token']} warm (datasets: {s['datasets_data_bytes_per_token']}); over the data "
        f"phase (until train.py reports its data): {s['data_phase_bytes_per_token']} cold, "
        f"{s['warm_data_phase_bytes_per_token']} warm. Baseline: 200 lines of the big file whose first step "
        f"trains on the same examples ({baseline_rows(payload)} tokens per row)",
        f"- warm start {s['warm_s']} s, of which data (find, check, map the store) {s['warm_data_s']} s = "
        f"{s['warm_data_over_cold']} of cold; cold prepared in {s['cold_prepare_s']} s. Start-up on 200 lines "
        f"{s['startup_s']} s; (warm - start-up) / cold = {s['warm_over_cold_beyond_startup']}",
        f"- the Rust tokenizer alone (one thread, no Python around it) takes {s['tokenizer_cpu_s']} CPU s for the "
        f"file's texts; the start-up, then that spread over every core: {s['cold_floor_over_datasets']} of the "
        "datasets time (a cold run whose preparation added nothing to the tokenizer's work)",
        f"- 2 ranks: data memory over the data phase {s['two_ranks_data_phase_mb']} MB vs "
        f"{s['one_rank_data_phase_mb']} MB for one ({s['two_over_one_rank']}x); at the run's peak "
        f"{s['two_ranks_data_mb']} MB vs {s['one_rank_data_mb']} MB",
        "",
        "| goal | met |",
        "|---|---|",
        *(f"| {goal} | {'not resolved' if met is None else 'yes' if met else 'no'} |"
          for goal, met in payload["goals"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
