"""The training benchmark's machinery at a tiny size, in process: the three systems train (ours through
minilora's own TrainingLoop), their losses are compared step by step (and a difference is caught), and the
results file, report and plot are written; every benchmark records its environment and writes its results
with the one harness."""

import ast
import copy
import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import torch
from train_utils import ROOT
from transformers import AutoConfig

from benchmarks import harness, levers, plot_throughput, step_profile
from benchmarks import throughput as bt
from benchmarks import throughput_report as report
from benchmarks import throughput_setup as setup
from benchmarks import throughput_systems as systems

STEPS, WARMUP, SEQ, BATCH = 4, 1, 32, 2


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """One run of all three systems on the tiny Phi-3 (fp32, CPU), recorded the way main() records them."""
    model_dir = tiny_model_dir("phi3")
    config = AutoConfig.from_pretrained(model_dir)
    work = tmp_path_factory.mktemp("bench-work")
    spec = bt.make_spec(Path(model_dir), torch.device("cpu"), SEQ, BATCH, STEPS, config, work, profile=True)
    run = bt.new_run("tiny-phi3", config, spec, "cpu")
    for system in setup.SYSTEMS:  # ours first: the references start from its initial LoRA weights
        bt.record(run, {**systems.run_system(system, spec), "round": 1}, WARMUP)
    return run


@pytest.mark.slow
def test_three_systems_train_and_their_losses_agree_step_by_step(tiny_run):
    losses = {name: tiny_run["systems"][name]["losses"] for name in setup.SYSTEMS}
    for name, values in losses.items():
        assert tiny_run["systems"][name]["status"] == "ok", name
        assert len(values) == STEPS, name
    # ours is the product's loop, not a copy of it; all three trained on the same batches.
    assert tiny_run["systems"]["ours"]["code_path"].startswith("minilora.training.loop.TrainingLoop.train_step")
    assert len({tiny_run["systems"][name]["batches_sha256"] for name in setup.SYSTEMS}) == 1
    # The adapters really trained (the parity below is about updates, not only the first forward).
    assert losses["ours"][-1] < losses["ours"][0] - 0.01
    rtol = report.PARITY_RTOL["fp32"]
    for ref in setup.REFERENCES:
        parity = tiny_run["parity"][ref]
        assert parity["steps"] == [STEPS, STEPS]
        assert parity["rtol"] == rtol
        assert parity["same_batches"]
        assert parity["ok"], parity
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses["ours"], losses[ref], strict=True))
        assert parity["max_rel_diff"] == pytest.approx(worst)
        assert worst <= rtol


@pytest.mark.slow
def test_parity_check_catches_a_diverging_or_missing_loss(tiny_run):
    diverged = copy.deepcopy(tiny_run)
    ref = diverged["systems"]["ref_loop"]
    ref["losses"][-1] *= 1 + 10 * report.PARITY_RTOL["fp32"]
    report.compare(diverged)
    assert not diverged["parity"]["ref_loop"]["ok"]
    assert diverged["parity"]["trainer"]["ok"]

    short = copy.deepcopy(tiny_run)
    short["systems"]["trainer"]["losses"].pop()
    report.compare(short)
    assert short["parity"]["trainer"]["steps"] == [STEPS, STEPS - 1]
    assert not short["parity"]["trainer"]["ok"]

    other_data = copy.deepcopy(tiny_run)
    other_data["systems"]["trainer"]["batches_sha256"] = "0" * 64
    report.compare(other_data)
    assert not other_data["parity"]["trainer"]["same_batches"]
    assert not other_data["parity"]["trainer"]["ok"]


@pytest.mark.slow
def test_results_file_report_and_plot_are_written(tiny_run, tmp_path):
    env = harness.environment(torch.device("cpu"))
    results = {"environment": env, "settings": {"steps": STEPS, "warmup": WARMUP, "rounds": 1, "lr": setup.LR,
                                                "targets": ["qkv_proj"]},
               "flops_formula": setup.FLOPS_FORMULA, "notes": report.NOTES, "runs": [tiny_run]}
    path = report.write(results, tmp_path)
    assert path == tmp_path / f"{env['date'][:10]}-cpu-train.json"
    saved = json.loads(path.read_text())
    assert {"environment", "settings", "runs", "goals", "flops_formula", "notes"} <= saved.keys()
    assert saved["environment"] == env
    run = saved["runs"][0]
    for name in setup.SYSTEMS:
        assert {"tokens_per_s", "peak_rss_mib", "time_to_first_step_s", "losses"} <= run["systems"][name].keys()
    for ref in setup.REFERENCES:
        assert {"tokens_per_s", "peak_memory", "time_to_first_step"} <= run["ratios"][ref].keys()
    assert any(g["goal"].startswith("seq 32: losses ours vs ref_loop") and g["status"] == "PASS"
               for g in saved["goals"])
    report_md = path.with_suffix(".md").read_text()
    assert "| ours |" in report_md and "- ours: minilora.training.loop.TrainingLoop.train_step" in report_md

    png = plot_throughput.plot(saved, tmp_path / "tiny.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_an_extra_profiled_step_says_where_the_time_goes(tiny_run):
    for name in ("ours", "ref_loop"):
        p = tiny_run["systems"][name]["profile"]
        assert 0 < p["total_ms"] <= p["wall_ms"] * 1.05  # self times of one thread fit in the step
        # The LoRA layers' matmuls and their dropout draws (0.05 on every target) are in every step.
        assert p["categories"]["GEMM (cuBLAS / aten)"] > 0
        assert p["categories"]["dropout"] > 0
    # Counted per step (two were profiled): one dropout draw per LoRA layer call, in the forward and in
    # the recompute, 4 targets (qkv, o, gate_up, down) in each of the 2 layers. On a CPU both systems draw
    # by minilora/dropout.py's law (randint), the reference because its masks are made ours.
    for name in ("ours", "ref_loop"):
        calls = tiny_run["systems"][name]["profile"]["calls"]
        assert calls.get("aten::randint") == 2 * 4 * 2 and not calls.get("aten::bernoulli_"), calls
    # The profiled step is extra: the timed steps and losses are the STEPS ones, the same as the trainer's.
    assert len(tiny_run["systems"]["ours"]["losses"]) == STEPS
    assert tiny_run["systems"]["trainer"].get("profile") is None
    table = "\n".join(step_profile.markdown(tiny_run, ["ours", "ref_loop"]))
    assert "| dropout |" in table and "| **total** |" in table


@pytest.mark.slow
def test_levers_run_minilora_loop_and_the_full_logits_loss_matches_the_chunked_one(tiny_model_dir):
    """The levers benchmark trains through TrainingLoop; swapping in transformers' full-logits loss changes the
    memory, not the numbers (same batches, initial weights and dropout masks)."""
    rows = {name: levers.run_variant(name, tiny_model_dir("phi3"), seq=16, batch=2, steps=3)
            for name in ("baseline", "full_logits_loss", "no_recompute")}
    for name, row in rows.items():
        assert row["status"] == "ok", name
        assert len(row["losses"]) == 3 and row["tokens_per_s"] > 0 and row["peak_mb"] > 0, name
    assert rows["full_logits_loss"]["losses"] == pytest.approx(rows["baseline"]["losses"], rel=1e-5)
    assert rows["no_recompute"]["losses"] == pytest.approx(rows["baseline"]["losses"], rel=1e-5)
    assert rows["baseline"]["losses"][0] != rows["baseline"]["losses"][-1]  # the adapter trained


@pytest.mark.parametrize("name,category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "GEMM (cuBLAS / aten)"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "GEMM (cuBLAS / aten)"),
    ("_fwd_kernel", "NF4 + LoRA fused GEMM (ours)"),
    ("_splitk_reduce_kernel", "NF4 + LoRA fused GEMM (ours)"),
    ("_dequant_kernel", "NF4 dequant (ours)"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int)",
     "NF4 dequant / 4-bit GEMM (bitsandbytes)"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64, 128>>",
     "attention"),
    ("void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float, unsigned int, 1, 4>",
     "dropout"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "elementwise and norms"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>",
     "loss (softmax, cross-entropy)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copies and casts"),
    ("aten::mm", "GEMM (cuBLAS / aten)"),
    ("aten::bernoulli_", "dropout"),
    ("MmBackward0", "autograd and Python"),
])
def test_profile_categories_of_known_kernel_and_operator_names(name, category):
    assert step_profile.categorize(name) == category


def test_no_benchmark_has_its_own_results_writer_or_environment_record():
    """Every results file gets the same environment block and naming: only harness.py defines them, and
    each benchmark that writes results takes them from there."""
    benchmarks = sorted((ROOT / "benchmarks").glob("*.py"))
    own, writers = [], []
    for path in benchmarks:
        tree = ast.parse(path.read_text())
        own += [f"{path.name}: {node.name}" for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                and node.name in ("write_results", "environment") and path.name != "harness.py"]
        if "write_results(" in path.read_text() and path.name != "harness.py":
            writers.append(path.name)
            from_harness = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                            and (n.module, n.level) in (("harness", 1), ("benchmarks.harness", 0))]
            assert any("write_results" in {a.name for a in n.names} for n in from_harness), path.name
    assert own == []
    assert {"kernels.py", "levers.py", "throughput_report.py", "epoch.py"} <= set(writers)


def test_environment_records_commit_device_threads_load_and_versions(monkeypatch):
    env = harness.environment("cpu")
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", env["commit"])
    assert env["device"] == "cpu" and env["device_name"]
    assert env["cpu_count"] >= 1 and env["torch_threads"] >= 1 and len(env["load_avg"]) == 3
    # The installed release, as pip names it (torch.__version__ adds a build tag such as +cu130 to some builds).
    assert env["torch"] == importlib.metadata.version("torch")
    assert {"python", "transformers", "bitsandbytes", "triton", "peft", "date"} <= env.keys()

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(harness.subprocess, "run", no_git)
    assert harness.git_commit() == "unknown"


def test_write_results_names_the_file_and_keeps_the_first_environment(tmp_path):
    payload = {"rows": [1, 2]}
    path = harness.write_results("demo", payload, "# demo\n", out_dir=tmp_path)
    env = payload["environment"]
    assert path == tmp_path / f"{env['date'][:10]}-cpu-demo.json"
    assert json.loads(path.read_text()) == payload
    assert path.with_suffix(".md").read_text() == "# demo\n"
    payload["rows"].append(3)  # rewritten after another measurement: same file, same environment record
    assert harness.write_results("demo", payload, out_dir=tmp_path, device_label="box") == tmp_path / (
        f"{env['date'][:10]}-box-demo.json")
    assert json.loads((tmp_path / f"{env['date'][:10]}-box-demo.json").read_text())["environment"] == env
    assert harness.device_slug({"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3"
