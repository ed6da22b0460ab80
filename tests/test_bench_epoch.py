"""The epoch benchmark's generated data and report (the timed runs themselves are the benchmark)."""

import statistics

from benchmarks.epoch import make_data, markdown


def test_generated_sets_are_fixed_and_long_tailed():
    for kind in ("alpaca", "chat"):
        records = make_data(kind, 300, seed=0, scale=1.0)
        assert records == make_data(kind, 300, seed=0, scale=1.0) != make_data(kind, 300, seed=1, scale=1.0)
        sizes = [len(str(r)) for r in records]
        # Long tail: the longest is several times the median, the point of padding-free batches.
        assert max(sizes) > 4 * statistics.median(sizes)


def test_report_compares_every_run_with_the_reference():
    run = lambda s, loss: {"train_s": s, "wall_s": s + 5, "peak_mem_mib": 700.0, "held_out_loss": loss}
    payload = {"environment": {"device": "cpu", "device_name": "cpu", "date": "d", "commit": "c", "torch": "x",
                               "torch_threads": 2, "cpu_count": 2, "load_avg": [1.0, 1.0, 1.0]},
               "settings": {"model": "tiny-phi3", "seq_len": 512},
               "datasets": {"alpaca": {"n_train": 10, "n_eval": 1, "real_tokens": 1000, "median_len": 90,
                                       "max_len": 512, "runs": {"reference": run(60.0, 2.0),
                                                                "minilora": {**run(30.0, 2.02),
                                                                             "recompute": "auto: none on a CPU"}}}},
               "goals": [{"what": "alpaca: speed", "value": 2.0, "pass": True}]}
    text = markdown(payload)
    assert "| minilora | 30.0 | 2.00x | 35.0 | 33 | 700 | 2.0200 | +1.00% |" in text
    assert "- PASS alpaca: speed: 2.000" in text
    assert "- minilora: recompute auto: none on a CPU" in text
