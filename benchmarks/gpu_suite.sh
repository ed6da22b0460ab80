#!/usr/bin/env bash
# Everything that needs a GPU, in one run of under 8 minutes: device info, the GPU tests, the kernel
# benchmark, the training benchmark against the reference stack, and with time left the CPU kernel
# suite on CUDA tensors, the one-epoch benchmark on long-tailed data, the memory-levers benchmark and
# the data-preparation benchmark (CPU). Run from the repository root on a CUDA machine:
#
#     bash benchmarks/gpu_suite.sh            # results in benchmarks/results/gpu-<date>/
#     OUT=/tmp/run bash benchmarks/gpu_suite.sh   # $OUT/summary.txt + $OUT/gpu_suite_results.tar.gz
#
# On a GPU machine with no network, put a bitsandbytes wheel in .whl/ first: the suite installs it and then
# this checkout (pip install --no-deps --no-build-isolation -e .). With OUT set, everything is also packed
# into one archive (for runners that return only a few files): unpack it into
# benchmarks/results/gpu-<date>-<gpu>/ and commit it with the summary.
#
# Every step has its own timeout and a failed step does not stop the next one; the summary at the end
# (also in $OUT/summary.txt) lists each step's status. The exit code is 0 when every step passed.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_FROM_CALLER="${OUT:-}"
OUT="${OUT:-benchmarks/results/gpu-$(date +%F)}"
mkdir -p "$OUT"
SUITE_START=$SECONDS
declare -a SUMMARY=()
FAILED=0

# The project is always installed (kernels/ becomes minilora.kernels). The machine has no network:
# bitsandbytes may only be there as a local wheel in .whl/, and the project installs without fetching
# its dependencies or a build environment.
if ! python3 -c "import bitsandbytes" >/dev/null 2>&1 && compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing bitsandbytes from .whl/"
    python3 -m pip install -q --no-index --no-deps .whl/*.whl
fi
echo "== installing minilora (editable)"
python3 -m pip install -q --no-deps --no-build-isolation -e .

# step NAME TIMEOUT_S LOGFILE COMMAND...: run with a timeout, log stdout+stderr, record the status.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    echo "== $name (timeout ${limit}s) -> $log"
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT"
        FAILED=1
    elif [ "$rc" -ne 0 ]; then
        status="FAIL (rc $rc)"
        FAILED=1
    fi
    tail -n 3 "$log" | sed 's/^/   /'
    SUMMARY+=("$(printf '%-34s %-12s %4ss  %s' "$name" "$status" "$((SECONDS - t0))" "$log")")
    return 0
}

# Time plan (8 minutes = 480 s; planned, not yet timed on a GPU), in order of what the run must not
# miss: the GPU tests (up to 210 s), the kernel benchmark (up to 80 s), FSDP at world size 1 (up to 90 s),
# the training benchmark (what is left up to 430 s; it skips a system that would not finish), then, only
# with time to spare, the CPU kernel suite on CUDA tensors and the memory levers.

# 1. The device and the software stack (written first: the rest is read against it). A missing
#    package shows here, not as a collection error that would hide every test of a step.
step "nvidia-smi" 15 "$OUT/nvidia-smi.txt" nvidia-smi
# `python -m minilora.env --check`: versions, device, and the fused kernels against PyTorch in each dtype.
step "environment and kernel check" 60 "$OUT/env.txt" python3 -m minilora.env --check
git rev-parse HEAD >"$OUT/commit.txt" 2>/dev/null || echo unknown >"$OUT/commit.txt"
git status --porcelain >>"$OUT/commit.txt" 2>/dev/null || true

# 2. Every test marked `gpu` (tests/test_gpu_markers.py fails on a CUDA-only test without the mark), selected by
#    marker so that a new one is never missed: bf16 dequant bit-exactness and the fused layer at Phi-3-mini
#    shapes, training in bf16 with the kernels vs PyTorch, auto mode's self-check, offload, varlen attention.
#    A test module that fails to import (a package missing here) is reported without stopping the others.
step "pytest gpu tests (-m gpu)" 210 "$OUT/pytest_gpu.txt" \
    python3 -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors tests

# 3. Kernel benchmark: NF4 dequant vs bitsandbytes, ours vs bnb + LoRA vs the bf16 floor, then the
#    dispatch crossovers and split-K tiles. Short timing runs (--quick: 40 ms per measurement) over all
#    four Phi-3-mini shapes and six M, so that the crossovers fit too. It stops starting measurements
#    after --budget-s and writes what it has (kernels.json, kernels.md).
step "kernel benchmark" 80 "$OUT/benchmark_kernels.txt" \
    python3 -m benchmarks.kernels --out "$OUT/kernels" --budget-s 50 --quick \
    --shapes qkv_proj o_proj gate_up_proj down_proj --ms 1 16 64 256 1024 4096

# 3b. FSDP2 at world size 1 on the GPU (NCCL, bf16 all-gathers, the 4-bit base as fsdp_nf4's shards): train.py
#     on a random 2-layer Llama, one process beside `--fsdp` under torchrun, 3 steps over the same batches; the
#     losses side by side, peak memory, base bytes ($OUT/fsdp/*-fsdp-run.{json,md}).
step "fsdp world size 1 (NCCL)" 90 "$OUT/benchmark_fsdp.txt" \
    python3 -m benchmarks.fsdp --run --ranks 1 --ddp-ranks --layers 2 --steps 3 --seq-len 256 --out "$OUT/fsdp"

# 4. Training benchmark: Phi-3-mini (random weights, built from its config) at sequence 2048, minilora's own
#    training loop vs transformers + PEFT in a hand-written reference loop vs transformers.Trainer: tokens/s,
#    peak memory, time to first step, loss parity, MFU, where a step's time goes (results and goals in
#    $OUT/train/*-train.{json,md}), then its bar chart. It gets what is left up to 430 s, less the plot and
#    kill grace; benchmarks.throughput starts no system that would outlast --budget-s and keeps what finished.
TRAIN_LIMIT=$((430 - (SECONDS - SUITE_START)))
if [ "$TRAIN_LIMIT" -ge 120 ]; then
    step "training benchmark" "$TRAIN_LIMIT" "$OUT/benchmark_train.txt" \
        python3 -m benchmarks.throughput --seqs 2048 --out "$OUT/train" --budget-s "$((TRAIN_LIMIT - 20))"
    step "training plot" 25 "$OUT/plot_train.txt" \
        bash -c 'python3 -m benchmarks.plot_throughput "$1"/*-train.json' _ "$OUT/train"
else
    SUMMARY+=("$(printf '%-34s %-12s %4ss  %s' "training benchmark" "SKIPPED" 0 "only ${TRAIN_LIMIT}s left of 430")")
    FAILED=1
fi

# 5. With time to spare only: the CPU kernel suite (fp32 and fp16, odd shapes, every branch forced,
#    tile configs, checkpointing) on CUDA tensors, then the memory levers (recompute off / every 2nd
#    layer, offload, 8-bit AdamW, full-logits loss) on Phi-3-mini at sequence 1024 (the training
#    benchmark's saved model is reused).
LEFT=$((470 - (SECONDS - SUITE_START)))
if [ "$LEFT" -ge 40 ]; then
    step "pytest kernels (CPU suite on GPU)" "$((LEFT < 75 ? LEFT : 75))" "$OUT/pytest_kernels_on_gpu.txt" \
        python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
fi
# 6. With time to spare only: one epoch over long-tailed alpaca data at Phi-3-mini shapes, seq 2048
#    (random weights): minilora at its defaults vs transformers 4-bit + PEFT + Trainer padding to the
#    longest example per batch; real tokens/s, peak memory, held-out loss ($OUT/epoch/*-epoch.{json,md}).
LEFT=$((470 - (SECONDS - SUITE_START)))
if [ "$LEFT" -ge 240 ]; then
    step "epoch benchmark" "$LEFT" "$OUT/benchmark_epoch.txt" \
        python3 -m benchmarks.epoch --gpu --sets alpaca --n 300 --out "$OUT/epoch" --timeout-s "$((LEFT / 3))"
else
    SUMMARY+=("$(printf '%-34s %-12s %4ss  %s' "epoch benchmark" "SKIPPED" 0 "only ${LEFT}s left")")
fi
LEFT=$((470 - (SECONDS - SUITE_START)))
if [ "$LEFT" -ge 60 ]; then
    step "levers benchmark" "$LEFT" "$OUT/benchmark_levers.txt" \
        python3 -m benchmarks.levers --seq 1024 --batch 2 --steps 5 --out "$OUT/levers" \
        --budget-s "$((LEFT - 15))"
else
    SUMMARY+=("$(printf '%-34s %-12s %4ss  %s' "levers benchmark" "SKIPPED" 0 "only ${LEFT}s left")")
fi
# 7. With time to spare only, where `datasets` is installed: data preparation at scale, a CPU benchmark
#    (5,000 generated lines; cold, warm and two ranks against the `datasets` map path) on this machine's
#    cores, with the GPU hidden so that both ranks of the two-rank run fit on one device.
LEFT=$((470 - (SECONDS - SUITE_START)))
if [ "$LEFT" -ge 150 ] && python3 -c "import datasets" >/dev/null 2>&1; then
    step "data benchmark (CPU)" "$LEFT" "$OUT/benchmark_data.txt" \
        env CUDA_VISIBLE_DEVICES= python3 -m benchmarks.data --quick --timed-runs 1 --out "$OUT/data"
else
    SUMMARY+=("$(printf '%-34s %-12s %4ss  %s' "data benchmark (CPU)" "SKIPPED" 0 \
        "only ${LEFT}s left, or no datasets package")")
fi

{
    echo "GPU suite: $(date -Iseconds), $((SECONDS - SUITE_START))s, commit $(head -n 1 "$OUT/commit.txt")"
    grep -E '^(torch|torch CUDA build|triton|bitsandbytes|device.*|fused kernels|check .*) ' "$OUT/env.txt" 2>/dev/null
    echo
    printf '%s\n' "${SUMMARY[@]}"
    echo
    for f in "$OUT/pytest_gpu.txt" "$OUT/pytest_kernels_on_gpu.txt"; do
        [ -f "$f" ] && echo "$(basename "$f"): $(grep -E '(passed|failed|error|skipped|no tests)' "$f" | tail -n 1)"
    done
    echo
    sed -n '/^GOALS:/,$p' "$OUT/benchmark_kernels.txt" 2>/dev/null
    grep -h -E '^\| (1 process|FSDP)' "$OUT/fsdp/"*-fsdp-run.md 2>/dev/null
    grep -h -E '^- (PASS|FAIL)' "$OUT/train/"*-train.md "$OUT/epoch/"*-epoch.md 2>/dev/null
    grep -h '^goals:' "$OUT/benchmark_train.txt" 2>/dev/null
    sed -n '/^| goal | met |/,$p' "$OUT/data/"*-data-quick.md 2>/dev/null
} | tee "$OUT/summary.txt"

# The device tool brings back at most 8 files from $OUT: when the caller chose $OUT, pack everything
# but the summary into one archive (unpack with: tar xzf gpu_suite_results.tar.gz).
if [ -n "$OUT_FROM_CALLER" ]; then
    archive=$(mktemp /tmp/gpu_suite_results.XXXXXX)
    tar czf "$archive" -C "$OUT" --exclude ./summary.txt . &&
        find "$OUT" -mindepth 1 ! -name summary.txt -delete &&
        mv "$archive" "$OUT/gpu_suite_results.tar.gz"
fi

exit "$FAILED"
