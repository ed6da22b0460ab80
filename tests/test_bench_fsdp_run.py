"""benchmarks/fsdp_run.py (`python -m benchmarks.fsdp --run`): its comparison and goals on made-up results, and its
command line. The multi-process training it launches is tested in tests/test_fsdp_train.py and test_distributed.py."""

import pytest

from benchmarks import fsdp
from benchmarks.fsdp_run import MIB, goals, same_losses, table

LOSSES = [10.0, 9.5, 9.0]


LAYER_MIB = 10.0  # one decoder layer in fp32: the load budget is the rank's shard of the model + 3 of them


def fake_run(name, ranks, fsdp_on, losses, peak, base_mib, tokens_per_s, load_peak, load_shard, load_held=None):
    shares = [int(base_mib * MIB)] + [int((base_mib - 1) * MIB)] * (ranks - 1)  # the table shows the largest
    return {"name": name, "ranks": ranks, "fsdp": fsdp_on, "losses": losses, "peak_rss_mib": peak,
            "base_bytes": {"ranks": shares, "whole": 100 * MIB}, "tokens_per_s": tokens_per_s,
            "load_peak_mib": load_peak, "load_held_mib": load_held or load_shard, "load_shard_mib": load_shard}


RUNS = [fake_run("1 process", 1, False, LOSSES, [1000.0], 100, 400.0, [120.0], [100.0]),
        fake_run("DDP 2 ranks", 2, False, [10.0, 9.5, 9.01], [900.0, 950.0], 100, 500.0,  # 1e-3 off
                 [500.0, 500.0], [100.0, 100.0]),  # no load goal for DDP
        fake_run("FSDP 2 ranks", 2, True, [x * (1 + 5e-6) for x in LOSSES], [700.0, 800.0], 52, 300.0,
                 [80.0, 81.0], [50.0, 51.0], [60.0, 61.0]),  # 81 / (51 + 30) = 1.00x: met (held: 61)
        fake_run("FSDP 4 ranks", 4, True, LOSSES, [500.0] * 4, 31, 200.0,
                 [60.0, 60.0, 60.0, 70.0], [25.0] * 4, [40.0] * 4)]  # 0.31x > 0.3x; 70 / 55 = 1.27x: not met


def sections(text):
    """The report's tables, each as {first cell: the row's cells}."""
    return [{line.split(" | ")[0].strip("| "): line.split(" | ") for line in part.splitlines()}
            for part in text.split("\n\n")]


def test_goals_compare_each_fsdp_run_with_one_process():
    checks = {g["goal"]: (g["value"], g["met"]) for g in goals(RUNS, LAYER_MIB)}
    load = "load peak <= the rank's shard of the model + 3 fp32 layers (10.0 MiB each), every rank"
    assert checks == {
        f"1 process: {load}": ("0.92x the budget (largest rank)", True),
        f"FSDP 2 ranks: {load}": ("1.00x the budget (largest rank)", True),
        f"FSDP 4 ranks: {load}": ("1.27x the budget (largest rank)", False),
        "FSDP 2 ranks: losses equal 1 process (rel 1e-05, every step)": ("equal", True),
        "FSDP 2 ranks: each rank's 4-bit base <= 0.55x 1 process": ("0.520x", True),
        "FSDP 4 ranks: each rank's 4-bit base <= 0.30x 1 process": ("0.310x", False),
    }
    assert not same_losses([10.0, 9.5 * (1 + 2e-5), 9.0], LOSSES)
    assert not same_losses(LOSSES[:2], LOSSES) and not same_losses([None, 9.5, 9.0], LOSSES)


def test_table_rows_carry_the_ratios_against_one_process():
    rows, load, checks = sections(table(RUNS, LAYER_MIB))
    assert rows["DDP 2 ranks"][2] == "no" and rows["FSDP 2 ranks"][2] == "yes"
    assert rows["FSDP 2 ranks"][3:7] == ["700, 800", "0.80x", "52.0", "0.52x"]
    assert rows["FSDP 4 ranks"][-2:] == ["200", "0.50x |"]
    assert load["FSDP 4 ranks"][1:] == ["60.0, 60.0, 60.0, 70.0", "40.0, 40.0, 40.0, 40.0", "25.0, 25.0, 25.0, 25.0",
                                        "55.0, 55.0, 55.0, 55.0", "1.09x, 1.09x, 1.09x, 1.27x |"]
    assert checks["FSDP 4 ranks: each rank's 4-bit base <= 0.30x 1 process"][-1] == "NO |"
    unrecorded = [{**run, "base_bytes": None} for run in RUNS]
    assert {g["value"] for g in goals(unrecorded, LAYER_MIB) if "base" in g["goal"]} == {"not recorded"}


def test_run_help_and_an_uneven_split(run_command, capsys, tmp_path):
    with pytest.raises(SystemExit) as done:
        fsdp.main(["--run", "--help"])
    assert done.value.code == 0 and "--ranks" in capsys.readouterr().out
    code, _, err = run_command(fsdp.main, ["--run", "--ranks", "3", "--model-dir", str(tmp_path / "model")])
    assert code == 2 and err.count("\n") == 1 and "FSDP 3 ranks" in err
    assert not (tmp_path / "model").exists()  # refused before the model is written


def test_a_ranks_shard_counts_what_the_root_will_shard_at_its_sharded_size():
    """fsdp_rank.held_bytes: a parameter FSDP sharded counts its local part; under FSDP, one not sharded yet (the
    root's, sharded at the first step) counts the dim-0 shard FSDP2 will keep: ceil(rows / world) rows."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from benchmarks.fsdp_rank import held_bytes

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(5, 3))  # fp32: 80 bytes, then 60 + 12
        assert held_bytes(model) == held_bytes(model, world=2) == 152  # nothing sharded: no FSDP, all whole
        fully_shard(model[0], mesh=init_device_mesh("cpu", (1,)))  # a group over one rank: the whole 80 bytes
        assert held_bytes(model) == 152
        assert held_bytes(model, world=2) == 80 + 2 * 5 * 4 + 2 * 4  # 3 rows over 2 ranks: 2 each
    finally:
        dist.destroy_process_group()
