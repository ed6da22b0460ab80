"""The init benchmark's generated weights hold the assumptions they are built for, and its report reads
its results (the runs themselves are the benchmark)."""

import bitsandbytes as bnb
import torch

from benchmarks.init import INITS, RANK, generated_weight, goals, markdown


def test_lowrank_weights_are_rank_8_plus_noise():
    w = generated_weight(768, 256, outliers=False, g=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(w.double())
    assert float((s[:RANK] ** 2).sum() / (s**2).sum()) > 0.99
    assert float(s[RANK] / s[RANK - 1]) < 0.2


def test_outlier_channels_make_nf4_round_the_rest_of_each_block_to_zero():
    """So the quantization error off those channels is -(L + N): low rank plus noise, what LoftQ fits."""
    w = generated_weight(256, 768, outliers=True, g=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    deq = bnb.functional.dequantize_4bit(packed, state)
    rest = torch.ones(768, dtype=torch.bool)
    rest[::64] = False
    assert float((deq[:, rest] == 0).float().mean()) > 0.95


def test_report_and_goals_read_the_results():
    module = lambda cut: {"quant_error": 0.1, "init_error": 0.1 * (1 - cut), "trained_error": 0.2,
                          "init_cancelled": cut, "trained_cancelled": -1.0}
    run = lambda cut, load: {"modules": {"a.0.qkv_proj": module(cut), "a.1.qkv_proj": module(cut + 0.1)},
                             "eval_before": 5.0, "eval_after": 4.0, "train_s": 1.0, "load_s": load}
    cuts = {"loftq": 0.4, "loftq:4": 0.1}
    loads = {"pissa": 1.1, "olora": 1.3}
    models = {name: {"about": name, "inits": {i: run(cuts.get(i, 0.0), loads.get(i, 1.0)) for i in INITS}}
              for name in ("demo", "lowrank", "outliers")}
    checked = goals(models)
    assert [(g["what"].split(":")[0], g["value"], g["pass"]) for g in checked] == [
        ("outliers model", "40.0%", True),  # loftq
        ("outliers model", "10.0%", False),  # loftq:4
        ("lowrank model (no outliers)", "40.0%", True),  # for contrast only
        ("demo model", "+0.0%", True), ("demo model", "+0.0%", True), ("demo model", "+10.0%", True),
        ("demo model", "+0.0%", True), ("demo model", "+30.0%", False)]  # loftq, loftq:4, pissa, pissa:4, olora
    env = {"device_name": "cpu", "date": "d", "commit": "c", "torch_threads": 2, "cpu_count": 2,
           "load_avg": [1.0, 1.0, 1.0]}
    text = markdown({"environment": env, "run": {}, "steps": 3, "repeats": 5, "models": models, "goals": checked,
                     "load_average_end": [1.0, 1.0, 1.0]})
    assert "| loftq | 0.1000 | 0.0550 | +40.0% / +45.0% / +50.0% | 5.0000 -> 4.0000 | 1.000 | +0.0% |" in text
    assert "| pissa | 0.1000 | 0.0950 | +0.0% / +5.0% / +10.0% | 5.0000 -> 4.0000 | 1.100 | +10.0% |" in text
