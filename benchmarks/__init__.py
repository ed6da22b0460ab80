"""minilora's benchmarks: each measures the product's own code path against the reference users would run
instead, in the same run, and writes its results with benchmarks.harness. Run from the repository root
(minilora installed, as for the tests):

    python -m benchmarks.throughput --quick      # a training step: minilora's loop vs transformers + PEFT (+ Trainer)
    python -m benchmarks.levers --quick     # what each memory lever saves and costs
    python -m benchmarks.kernels            # one LoRA layer over a 4-bit weight (CUDA)
    python -m benchmarks.plot_throughput FILE.json     # charts from a training results file
    bash benchmarks/gpu_suite.sh            # everything that needs a GPU, in one run
"""
