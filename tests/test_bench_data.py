"""The data benchmark's own parts: the generated file, the memory reading, the summary against its goals."""

import json
import os

from benchmarks.data import _pss_kb, _tree, generate, render, summarize


def test_generated_file_is_seeded_alpaca_with_long_tailed_lengths(tmp_path):
    generate(tmp_path / "a.jsonl", 300)
    generate(tmp_path / "b.jsonl", 300)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    lengths = sorted(len(r["output"]) for r in records)
    assert set(records[0]) == {"instruction", "input", "output"}
    assert lengths[-1] > 4 * lengths[len(lengths) // 2]  # a long tail


def test_memory_is_read_for_the_process_tree():
    total, without_libs = _pss_kb(os.getpid())
    assert total > without_libs > 0
    assert os.getpid() in _tree(os.getpid())


def test_summary_checks_each_goal():
    def r(wall, mb):
        return {"wall_s": wall, "peak_pss_mb": mb, "peak_pss_no_libs_mb": mb, "exit_code": 0, "data_s": 1.0}

    runs = {"ours_cold_small": r(10, 500), "ours_warm_small": r(9, 500), "datasets_small": r(5, 400),
            "ours_2ranks_small": r(12, 1000), "ours_cold_big": r(20, 600), "ours_warm_big": r(10, 520),
            "datasets_big": r(50, 900), "ours_2ranks_big": r(25, 1120)}
    payload = summarize(runs, tokens=50 * 2**20, n_lines=100, n_bytes=2**20)
    assert payload["summary"]["data_bytes_per_token"] == 2.0
    assert payload["summary"]["two_over_one_rank"] == 1.2
    assert all(payload["goals"].values()), payload["goals"]
    payload["environment"] = {"commit": "abc", "date": "2026-12-01T00:00:00", "cpu_count": 2, "load_avg": [1, 1, 1]}
    payload["load_avg_end"] = [1, 1, 1]
    assert "| data memory <= 4 bytes/token | yes |" in render(payload)
