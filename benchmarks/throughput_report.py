"""The training benchmark's parent-side analysis: each system's rounds merged into one summary, the ratios
ours / reference, the loss parity, the goal checks, and the results file and Markdown report.

Pure functions of the results dict that benchmarks.throughput builds; benchmarks.plot_throughput draws from
the file written here.
"""

import math
import statistics
from pathlib import Path

from .harness import write_results
from .step_profile import markdown as profile_table
from .throughput_setup import FLOPS_FORMULA, LORA, MAX_GRAD_NORM, REFERENCES, SYSTEMS

# Loss agreement between ours and each reference, relative. fp32 (CPU): only summation order and the
# chunked loss differ. bf16 (GPU): the reference keeps its residual stream in fp32
# (prepare_model_for_kbit_training upcasts norms and embeddings), ours in bf16, whose epsilon is 2^-8.
PARITY_RTOL = {"fp32": 1e-4, "bf16": 1e-2}

# How the numbers were taken: the report's Method section, also saved in the results file.
NOTES = [
    "ours is minilora's own training step: minilora.training.loop.TrainingLoop.train_step, driven step by step, "
    "with the model and loop built as minilora.training.job builds them from a TrainConfig of this recipe "
    "(constant lr: warm-up 0, cosine floor 1.0; one micro-batch per step; padded batching). ref_loop is a "
    "hand-written reference step (AdamW as minilora's: foreach on CPU, fused on GPU; clipping) over the reference "
    "model; trainer is transformers.Trainer (TrainingArguments: gradient (activation) checkpointing with "
    "use_reentrant=False, constant lr, sequential sampler, adamw_torch on CPU / adamw_torch_fused on GPU). Each "
    "system's code_path is saved with its results.",
    "Same batches: the references build theirs with minilora.data.batching.make_batches, the call ours' loop "
    "makes; each system saves a sha256 of the batches it trained on, and loss parity requires them equal.",
    "Loss: ours sums cross-entropy over target tokens in chunks (minilora.training.loss) and divides by their "
    "count; the "
    "references use the model's own loss from full logits (what users run). Both are the mean over B*(T-1) tokens.",
    "Dropout 0.05 is on in all systems: torch.manual_seed(seed + step) before every step (the trainer via "
    "on_step_begin) and the same module order give identical masks, checkpoint recompute included.",
    "Precision: fp32 on CPU (NF4 compute dtype fp32, no autocast); bf16 on GPU (compute dtype bf16 + bf16 "
    "autocast in all three; the reference's norms, embeddings and lm_head are fp32 after "
    "prepare_model_for_kbit_training, as users get them).",
    "On CPU the references' Linear4bit layers get support_avx512bf16_for_cpu = False, as minilora.load_base "
    "sets it: no in-place repack of the 4-bit weights, so both sides compute the same thing.",
    "Each system runs in its own process, one after the other. Time to first step: from the start of the "
    "system's setup (its library imports after torch, loading, quantisation, LoRA setup) to the end of optimizer "
    "step 1 (warm-up and, on GPU, kernel compilation included). Peak memory is reset after loading, so it covers "
    "training (weights included). Step times: ours' whole train_step() (it takes its batch from the loop's "
    "stream and moves it to the device itself), ref_loop's step on batches already on the device, the trainer's "
    "on_step_begin -> on_step_end (its data loading and logging outside); all are device-synchronised.",
]


def merge_rounds(rounds: list[dict], warmup: int) -> dict:
    """One system's runs -> its summary. tokens/s pools every timed step of every good round: rounds run
    the systems in alternating order, so a load change on a shared machine falls on all of them alike."""
    ok = [r for r in rounds if r.get("status") == "ok" and len(r.get("step_s", [])) > warmup]
    merged = {k: v for k, v in (ok or rounds)[0].items() if k != "step_s"}
    merged["round_status"] = [r.get("status") for r in rounds]
    if not ok:
        return merged

    def rate(r):
        return [r["tokens_per_step"] / s for s in r["step_s"][warmup:]]

    tps = sorted(t for r in ok for t in rate(r))
    q = statistics.quantiles(tps, n=5) if len(tps) > 1 else [tps[0]] * 4
    merged.update(status="ok", tokens_per_s=statistics.median(tps), tokens_per_s_p20=q[0], tokens_per_s_p80=q[3],
                  tokens_per_s_best_step=tps[-1], timed_steps=len(tps),
                  tokens_per_s_by_round=[statistics.median(rate(r)) for r in ok],
                  time_to_first_step_s=statistics.median(r["time_to_first_step_s"] for r in ok),
                  losses_max_diff_between_rounds=max((abs(a - b) for r in ok[1:]
                                                      for a, b in zip(ok[0]["losses"], r["losses"], strict=False)),
                                                     default=None))
    for key in ("peak_allocated_mib", "peak_reserved_mib", "peak_rss_mib"):
        if ok[0].get(key) is not None:
            merged[key] = max(r[key] for r in ok)
    if ok[0].get("rss_after_load_mib") is not None:
        merged["rss_growth_in_training_mib"] = max(r["peak_rss_mib"] - r["rss_after_load_mib"] for r in ok)
    return merged


def memory_mib(result: dict) -> float | None:
    return result.get("peak_allocated_mib") or result.get("peak_rss_mib")


def compare(run: dict) -> None:
    """Ratios ours / reference and loss parity, in place."""
    ours = run["systems"].get("ours", {})
    rtol = PARITY_RTOL[run["precision"]]
    run["ratios"], run["parity"] = {}, {}
    for ref in REFERENCES:
        other = run["systems"].get(ref)
        if not other or ours.get("status") != "ok" or other.get("status") != "ok":
            continue
        r = {}
        for key in ("tokens_per_s", "tokens_per_s_best_step"):
            if ours.get(key) and other.get(key):
                r[key] = ours[key] / other[key]
        if memory_mib(ours) and memory_mib(other):
            r["peak_memory"] = memory_mib(ours) / memory_mib(other)
        if ours.get("peak_reserved_mib") and other.get("peak_reserved_mib"):
            r["peak_reserved"] = ours["peak_reserved_mib"] / other["peak_reserved_mib"]
        if ours.get("time_to_first_step_s") and other.get("time_to_first_step_s"):
            r["time_to_first_step"] = ours["time_to_first_step_s"] / other["time_to_first_step_s"]
        run["ratios"][ref] = r
        a, b = ours["losses"], other["losses"]
        same_batches = ours.get("batches_sha256") is not None and ours.get("batches_sha256") == other.get(
            "batches_sha256")
        diffs = [abs(x - y) for x, y in zip(a, b, strict=False)]
        rel = [d / abs(y) for d, y in zip(diffs, b, strict=False)]
        run["parity"][ref] = {
            "steps": [len(a), len(b)], "max_abs_diff": max(diffs, default=None),
            "max_rel_diff": max(rel, default=None), "rtol": rtol,
            "loss_change_ours": a[-1] - a[0] if a else None, "same_batches": same_batches,
            "ok": same_batches and len(a) == len(b) > 0 and all(math.isfinite(x) for x in a + b)
            and max(rel) <= rtol}
    if run["device"] == "cuda" and run.get("peak_flops"):
        for res in run["systems"].values():
            if res.get("tokens_per_s"):
                res["mfu"] = res["tokens_per_s"] * run["flops_per_token"] / run["peak_flops"]


def goals(results: dict) -> list[dict]:
    """The benchmark's goals, each PASS / FAIL / n/a with the measured value."""
    out = []

    def add(text, value, ok):
        out.append({"goal": text, "value": value, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL")})

    for run in results["runs"]:
        tag = f"seq {run['seq']}"
        ratios, parity = run.get("ratios", {}), run.get("parity", {})
        for ref in REFERENCES:
            p = parity.get(ref)
            add(f"{tag}: losses ours vs {ref} agree (rtol {PARITY_RTOL[run['precision']]:g})",
                p and p["max_rel_diff"], p and p["ok"])
        if run["device"] == "cpu":
            v = ratios.get("ref_loop", {}).get("tokens_per_s")
            loads = [x["load_avg_after"][0] for rs in run["raw"].values() for x in rs if "load_avg_after" in x]
            noisy = (f" [noisy: load average up to {max(loads):.1f} on {results['environment']['cpu_count']} CPUs]"
                     if loads and max(loads) > results["environment"]["cpu_count"] else "")
            add(f"{tag}: tokens/s ours / ref_loop >= 1.0 (CPU){noisy}", v, None if v is None else v >= 1.0)
            continue
        if run["seq"] != 2048 or run["model"] != "phi3-mini":
            continue
        for ref in REFERENCES:
            v = ratios.get(ref, {}).get("tokens_per_s")
            add(f"{tag}: tokens/s ours / {ref} >= 2.0", v, None if v is None else v >= 2.0)
        for ref in REFERENCES:
            v = ratios.get(ref, {}).get("peak_memory")
            add(f"{tag}: peak allocated ours / {ref} <= 0.6", v, None if v is None else v <= 0.6)
        v = run["systems"].get("ours", {}).get("mfu")
        add(f"{tag}: MFU ours >= 50%", v, None if v is None else v >= 0.5)
    return out


def show(v, fmt="{:.2f}", none="-") -> str:
    """v formatted, or `none` where there is no value."""
    return none if v is None else fmt.format(v)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Training benchmark: {env['device_name']}", "",
             f"{env['date']}, commit {env['commit']}; torch {env['torch']}, transformers {env['transformers']}, "
             f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}; {env['torch_threads']} threads on "
             f"{env['cpu_count']} CPUs, load average {' / '.join(f'{x:.2f}' for x in env['load_avg'])} "
             "(1/5/15 min) at the start.", ""]
    s = results["settings"]
    lines += [f"LoRA r={LORA['r']}, alpha={LORA['alpha']}, dropout={LORA['dropout']} on "
              f"{', '.join(s['targets'])}; NF4 + double quant; AdamW lr {s['lr']} constant, clip {MAX_GRAD_NORM}. "
              f"{s['steps']} steps per run, {s['rounds']} run(s) per system in alternating order; tokens/s = "
              f"median over every run's last {s['steps'] - s['warmup']} steps (p20-p80 in brackets). Ratios are "
              "ours / that system (tokens/s: > 1 is ours faster; memory: < 1 is ours smaller). Synthetic Zipf "
              "tokens, every token a target; identical batches, initial LoRA weights and dropout masks (RNG "
              "re-seeded per step) in all systems.", ""]
    for run in results["runs"]:
        cfg = run["config"]
        mem_head = "peak alloc / reserved MiB" if run["device"] == "cuda" else "peak RSS MiB (growth in training)"
        lines += [f"## {run['model']} (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab "
                  f"{cfg['vocab_size']}), seq {run['seq']}, batch {run['batch']}, {run['precision']}", "",
                  f"| system | tokens/s | ours / it | {mem_head} | ours / it | time to 1st step s | "
                  "loss first -> last | max rel. loss diff vs ours | MFU |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for name in SYSTEMS:
            r = run["systems"].get(name)
            if r is None:
                continue
            if r.get("status") != "ok":
                lines.append(f"| {name} | {r.get('status')} | | | | | | | |")
                continue
            ratio = run.get("ratios", {}).get(name, {})
            tps = (f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_p20']:,.0f}-{r['tokens_per_s_p80']:,.0f})"
                   if r.get("tokens_per_s") else "-")
            mem = (f"{r['peak_allocated_mib']:,.0f} / {r['peak_reserved_mib']:,.0f}" if "peak_allocated_mib" in r
                   else f"{show(r.get('peak_rss_mib'), '{:,.0f}')} "
                        f"({show(r.get('rss_growth_in_training_mib'), '{:+,.0f}')})")
            losses = r.get("losses") or []
            loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
            par = run.get("parity", {}).get(name)
            lines.append(f"| {name} | {tps} | {show(ratio.get('tokens_per_s'))} | {mem} | "
                         f"{show(ratio.get('peak_memory'))} | {show(r.get('time_to_first_step_s'), '{:.1f}')} | "
                         f"{loss} | {show(par and par['max_rel_diff'], '{:.1e}')} | "
                         f"{show(r.get('mfu'), '{:.1%}', 'n/a')} |")
        loads = [x["load_avg_after"][0] for runs in run["raw"].values() for x in runs if "load_avg_after" in x]
        best = [f"{name} {r['tokens_per_s_best_step']:,.0f}" + (
                    f" (ours / it {run['ratios'][name]['tokens_per_s_best_step']:.2f})"
                    if "tokens_per_s_best_step" in run.get("ratios", {}).get(name, {}) else "")
                for name, r in run["systems"].items() if r.get("tokens_per_s_best_step")]
        lines += ["", f"Fastest single step, tokens/s (the one least disturbed by other processes): {', '.join(best)}.",
                  "", "Code path of each system:", "",
                  *[f"- {name}: {r['code_path']}" for name, r in run["systems"].items() if r.get("code_path")]]
        cpus = results["environment"]["cpu_count"]
        if run["device"] == "cpu" and loads and max(loads) > cpus:
            lines += ["", f"Other processes competed for the {cpus} CPUs (1-minute load average after each run: "
                      f"{', '.join(f'{x:.1f}' for x in loads)}): step times are noisy, and ratios within the "
                      "p20-p80 spread are not a measured difference."]
        lines.append("")
        lines += profile_table(run, ["ours", "ref_loop"])
        if run["device"] == "cuda":
            lines += [f"MFU: {run['flops_per_token'] / 1e9:.2f} GFLOP/token against "
                      f"{show(run.get('peak_flops') and run['peak_flops'] / 1e12, '{:.0f}', 'unknown')} TFLOP/s "
                      "bf16 dense peak.", ""]
    lines += ["## Goals", "", *[f"- {g['status']} {g['goal']}: {show(g['value'], '{:.3g}')}" for g in results["goals"]],
              "", "## Method", "", *[f"- {n}" for n in results["notes"]], f"- {FLOPS_FORMULA}", ""]
    return "\n".join(lines)


def write(results: dict, out: Path) -> Path:
    """The goals checked, then <out>/<date>-<device>-train.json and .md (benchmarks.harness.write_results)."""
    results["goals"] = goals(results)
    return write_results("train", results, markdown(results), out_dir=out)
