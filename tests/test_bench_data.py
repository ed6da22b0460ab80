"""The data benchmark's own parts: the generated file, the memory reading, the summary against its goals."""

import json
import os
import sys

from benchmarks.data import _pss_kb, _tree, generate, measure, render, summarize, write_baseline


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


def test_a_timed_run_is_not_sampled_and_a_sampled_one_reads_its_memory(tmp_path):
    cmd = [sys.executable, "-c", "import time; x = b'x' * (50 << 20); print('data: ready'); time.sleep(0.5)"]
    timed = measure(cmd, tmp_path / "timed.log", sample=False)
    sampled = measure(cmd, tmp_path / "sampled.log")
    assert timed["exit_code"] == sampled["exit_code"] == 0 and timed["wall_s"] >= 0.5
    assert timed["peak_pss_mb"] == 0  # nothing read beside it
    assert sampled["peak_pss_no_libs_mb"] > 50  # the 50 MB it holds


def test_summary_checks_each_goal():
    def r(wall, mb, phase):
        return {"wall_s": wall, "peak_pss_mb": mb, "peak_pss_no_libs_mb": mb, "data_phase_peak_no_libs_mb": phase,
                "exit_code": 0, "data_s": 1.0}

    runs = {"ours_cold_small": r(10, 500, 300), "ours_warm_small": r(9, 500, 300), "datasets_small": r(5, 400, 400),
            "ours_2ranks_small": r(12, 1000, 600), "ours_cold_big": r(20, 600, 450), "ours_warm_big": r(10, 520, 310),
            "datasets_big": r(50, 900, 900), "ours_2ranks_big": r(25, 990, 780)}
    payload = summarize(runs, tokens=50 * 2**20, n_lines=100, n_bytes=2**20, tokenizer_cpu_s=2 * os.cpu_count())
    assert payload["summary"]["cold_floor_over_datasets"] == 0.22  # (9 s start-up + 2 s) / 50 s
    assert payload["summary"]["data_bytes_per_token"] == 2.0  # 100 MB at the peak over 50 Mi tokens
    assert payload["summary"]["data_phase_bytes_per_token"] == 3.0  # 150 MB while preparing
    assert payload["summary"]["two_over_one_rank"] == 1.2  # 180 MB over the data phase vs 150 MB
    assert all(payload["goals"].values()), payload["goals"]
    runs["ours_cold_big"]["data_phase_peak_no_libs_mb"] = 560  # 5.2 bytes/token while preparing
    assert not summarize(runs, 50 * 2**20, 100, 2**20)["goals"]["data memory <= 4 bytes/token"]
    payload["environment"] = {"commit": "abc", "date": "2026-12-01T00:00:00", "cpu_count": 2, "load_avg": [1, 1, 1]}
    payload["load_avg_end"] = [1, 1, 1]
    assert "| data memory <= 4 bytes/token | yes |" in render(payload)


def test_the_baseline_file_trains_its_first_step_on_the_big_files_examples(tmp_path):
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    generate(big, 300)
    baseline = write_baseline(big, tmp_path / "cache", small, 40)  # raises if the first steps differ
    big_lines, small_lines = big.read_text().splitlines(), small.read_text().splitlines()
    assert len(small_lines) == 40 and set(small_lines) <= set(big_lines)
    first = [big_lines[line - 1] for row in baseline["first_step_lines"] for line in row]
    assert len(first) == 8 and set(first) <= set(small_lines)  # two rows of 4 examples (--batch-size 4)
    assert len(baseline["first_step_rows"]) == 2
