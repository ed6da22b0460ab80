"""The training benchmark's machinery at a tiny size, in process: the three systems train, their losses are
compared step by step (and a difference is caught), and the results file, report and plot are written; both
benchmarks record the commit with the same helper."""

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parents[1]
STEPS, WARMUP, SEQ, BATCH = 4, 1, 32, 2


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bt = load_script("bench_train")  # the orchestrator; it puts benchmarks/ on sys.path for the modules below
setup, systems, report = (importlib.import_module(m) for m in ("train_setup", "train_systems", "train_report"))


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """One run of all three systems on the tiny Phi-3 (fp32, CPU), recorded the way main() records them."""
    model_dir = tiny_model_dir("phi3")
    config = AutoConfig.from_pretrained(model_dir)
    work = tmp_path_factory.mktemp("bench-work")
    spec = bt.make_spec(Path(model_dir), torch.device("cpu"), SEQ, BATCH, STEPS, config.vocab_size, work,
                        profile=True)
    run = bt.new_run("tiny-phi3", config, spec, "cpu")
    for system in setup.SYSTEMS:  # ours first: the references start from its initial LoRA weights
        bt.record(run, {**systems.run_system(system, spec), "round": 1}, WARMUP)
    return run


def test_three_systems_train_and_their_losses_agree_step_by_step(tiny_run):
    losses = {name: tiny_run["systems"][name]["losses"] for name in setup.SYSTEMS}
    for name, values in losses.items():
        assert tiny_run["systems"][name]["status"] == "ok", name
        assert len(values) == STEPS, name
    # The adapters really trained (the parity below is about updates, not only the first forward).
    assert losses["ours"][-1] < losses["ours"][0] - 0.01
    rtol = report.PARITY_RTOL["fp32"]
    for ref in setup.REFERENCES:
        parity = tiny_run["parity"][ref]
        assert parity["steps"] == [STEPS, STEPS]
        assert parity["rtol"] == rtol
        assert parity["ok"], parity
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses["ours"], losses[ref], strict=True))
        assert parity["max_rel_diff"] == pytest.approx(worst)
        assert worst <= rtol


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


def test_results_file_report_and_plot_are_written(tiny_run, tmp_path):
    env = bt.environment(torch.device("cpu"), torch.get_num_threads())
    results = {"env": env, "settings": {"steps": STEPS, "warmup": WARMUP, "rounds": 1, "lr": setup.LR,
                                        "targets": ["qkv_proj"]},
               "flops_formula": setup.FLOPS_FORMULA, "notes": report.NOTES, "runs": [tiny_run]}
    path = report.write(results, tmp_path, "tiny-cpu-train")
    saved = json.loads(path.read_text())
    assert {"env", "settings", "runs", "goals", "flops_formula", "notes"} <= saved.keys()
    assert {"device_name", "commit", "date", "torch", "transformers", "bitsandbytes", "peft"} <= saved["env"].keys()
    run = saved["runs"][0]
    for name in setup.SYSTEMS:
        assert {"tokens_per_s", "peak_rss_mib", "time_to_first_step_s", "losses"} <= run["systems"][name].keys()
    for ref in setup.REFERENCES:
        assert {"tokens_per_s", "peak_memory", "time_to_first_step"} <= run["ratios"][ref].keys()
    assert any(g["goal"].startswith("seq 32: losses ours vs ref_loop") and g["status"] == "PASS"
               for g in saved["goals"])
    assert "| ours |" in path.with_suffix(".md").read_text()

    png = load_script("plot").plot(saved, tmp_path / "tiny.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_extra_profiled_step_says_where_the_time_goes(tiny_run):
    profile_module = importlib.import_module("step_profile")
    for name in ("ours", "ref_loop"):
        p = tiny_run["systems"][name]["profile"]
        assert 0 < p["total_ms"] <= p["wall_ms"] * 1.05  # self times of one thread fit in the step
        # The LoRA layers' matmuls and their dropout draws (0.05 on every target) are in every step.
        assert p["categories"]["GEMM (cuBLAS / aten)"] > 0
        assert p["categories"]["dropout"] > 0
    # Counted per step (two were profiled): one dropout draw per LoRA layer call, in the forward and in
    # the recompute, 4 targets (qkv, o, gate_up, down) in each of the 2 layers.
    top = {t["name"]: t["count"] for t in tiny_run["systems"]["ours"]["profile"]["top"]}
    assert top.get("aten::bernoulli_") == 2 * 4 * 2, top
    # The profiled step is extra: the timed steps and losses are the STEPS ones, the same as the trainer's.
    assert len(tiny_run["systems"]["ours"]["losses"]) == STEPS
    assert tiny_run["systems"]["trainer"].get("profile") is None
    table = "\n".join(profile_module.markdown(tiny_run, ["ours", "ref_loop"]))
    assert "| dropout |" in table and "| **total** |" in table


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
    assert importlib.import_module("step_profile").categorize(name) == category


def test_both_benchmarks_record_the_commit_the_same_way(monkeypatch):
    common = importlib.import_module("common")
    assert load_script("bench_kernels").git_commit is common.git_commit is bt.git_commit
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", common.git_commit())

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(common.subprocess, "run", no_git)
    assert common.git_commit() == "unknown"
