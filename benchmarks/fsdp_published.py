"""Published per-GPU memory of FSDP-QLoRA runs of Llama-2-70B on two GPUs, with the settings each used, and
what each reference holds that minilora's plan does not (so a difference is explained line by line).

Answer.AI, fsdp_qlora (FSDP1 + PEFT LoRA over bitsandbytes NF4 stored as bf16):
    https://github.com/AnswerDotAI/fsdp_qlora/blob/main/benchmarks_03_2024.md ("Llama-2 70B", 2x RTX 3090 and
    2x RTX 4090: 14.92 GiB peak, CPU offload, batch size 2, context 2048). The runs use the command template
    of that page: --train_type qlora --use_gradient_checkpointing True --reentrant_checkpointing True; train.py's
    defaults give the rest: LoRA r=64, alpha 16, dropout 0.1, targets q/k/v/gate/up/down_proj (its "all": no
    o_proj), no activation offloading, pure bf16, AdamW. The figure is torch.cuda.max_memory_reserved (the page
    calls it reserved memory; train.py logs it), which leaves out the CUDA context.
PEFT, "FSDP + QLoRA" guide (accelerate FSDP1, TRL SFTTrainer):
    https://huggingface.co/docs/peft/accelerate/fsdp ("Memory usage": 19.6 GB per GPU with CPU offloading,
    35.6 GB without). examples/sft/run_peft_qlora_fsdp.sh: per-device batch 2, max_seq_len 2048 with packing,
    gradient checkpointing (use_reentrant True), flash attention 2, LoRA r=8, alpha 16, dropout 0.1,
    "all-linear" (q/k/v/o/gate/up/down_proj), NF4 with nested quantization and bf16 quant storage, bf16.
    The guide does not say how it measured; its 35.6 GB does not fit a 24 GB card, so both runs were on
    larger GPUs. "GB" is read as GiB here (what nvidia-smi's MiB make).

Lines the references hold and the plan does not:
    - bitsandbytes' quant_state (absmax and nested statistics) is a Python attribute of each layer, not a
      parameter: FSDP1 neither shards nor offloads it, so every GPU holds all of it (the plan shards it).
    - transformers' causal-LM loss materialises all logits in fp32 (minilora's loss works in chunks).
    - Both wrap each decoder layer as an FSDP unit and leave the input embeddings in the root unit, which FSDP1
      keeps gathered from the forward to the end of the backward; minilora gives them a group of their own,
      gathered for their forward only.
    - Answer.AI's figure leaves out the CUDA context that the plan counts.
"""

from dataclasses import dataclass, replace

from .fsdp_plan import (
    ALLOCATOR_SLACK,
    COMPUTE_BYTES,
    CUDA_CONTEXT_BYTES,
    LOGIT_BYTES,
    GiB,
    Plan,
    Settings,
    loss_bytes,
)

LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ANSWERAI_ALL = ("k_proj", "q_proj", "v_proj", "up_proj", "down_proj", "gate_proj")  # train.py's "all"


@dataclass(frozen=True)
class Published:
    name: str
    url: str
    gib: float  # the published figure, GiB per GPU
    measured: str  # what the figure counts
    offload: bool
    r: int
    targets: tuple[str, ...]
    context_counted: bool  # whether the figure includes the CUDA context

    def settings(self, base: Settings) -> Settings:
        return replace(base, gpus=2, gpu_gib=24.0, offload=self.offload, batch_size=2, seq_len=2048,
                       recompute="full", r=self.r, targets=self.targets, dropout=0.1)


PUBLISHED = (
    Published("Answer.AI fsdp_qlora, CPU offload",
              "https://github.com/AnswerDotAI/fsdp_qlora/blob/main/benchmarks_03_2024.md", 14.92,
              "torch.cuda.max_memory_reserved", True, 64, ANSWERAI_ALL, context_counted=False),
    Published("PEFT FSDP+QLoRA guide, CPU offload", "https://huggingface.co/docs/peft/accelerate/fsdp", 19.6,
              "not stated (GB read as GiB)", True, 8, LLAMA_ALL, context_counted=True),
    Published("PEFT FSDP+QLoRA guide, no offload", "https://huggingface.co/docs/peft/accelerate/fsdp", 35.6,
              "not stated (GB read as GiB)", False, 8, LLAMA_ALL, context_counted=True),
)

# What the results file says under its table.
NOTES = (
    "Reference lines: what the published runs hold and minilora's plan does not. bitsandbytes' quant_state "
    "(absmax, nested statistics) is a Python attribute that FSDP1 neither shards nor offloads; transformers' "
    "loss makes all logits in fp32 (minilora's works in chunks of rows); both keep the input embeddings in the "
    "root FSDP unit, gathered through the backward (minilora's own group gathers them for their forward only); "
    "Answer.AI's figure "
    "(torch.cuda.max_memory_reserved) leaves out the CUDA context. Not modelled: PEFT's offloaded run "
    "(its guide lists GPU memory saving with CPU offloading as untested; both PEFT runs were on cards larger "
    "than 24 GB, where the caching allocator keeps what it freed), and how PEFT's LoRA layers differ from "
    "minilora's in what the one recomputed layer keeps.")


def reference_lines(ref: Published, p: Plan) -> dict[str, float]:
    """Bytes per GPU the reference holds beyond the plan (negative: less), each with its reason; the allocator
    slack the plan applies to its own lines is applied to these too."""
    s, inv = p.settings, p.inventory
    _, stats, _ = inv.layer_nf4()
    stats_total = inv.layers * stats
    on_gpu = 0 if s.offload else stats_total / s.gpus  # what the plan keeps of the statistics per GPU
    lines = {
        "quant_state whole on each GPU (not sharded, not offloaded)": stats_total - on_gpu,
        "all logits in fp32 (transformers' loss) instead of chunks":
            s.tokens * inv.vocab * LOGIT_BYTES - loss_bytes(inv, s.tokens),
        "embeddings gathered in the root unit through backward": inv.embeddings * COMPUTE_BYTES,
    }
    lines = {name: value * (1 + ALLOCATOR_SLACK) for name, value in lines.items()}
    if not ref.context_counted:
        lines["CUDA context not in the figure"] = -CUDA_CONTEXT_BYTES
    return lines


def comparison_rows(ref: Published, p: Plan) -> dict:
    extra = reference_lines(ref, p)
    adjusted = p.gpu_total + sum(extra.values())
    return {"reference": ref.name, "url": ref.url, "measured": ref.measured, "published_gib": ref.gib,
            "plan_gib": p.gpu_total / GiB, "ratio": p.gpu_total / GiB / ref.gib,
            "reference_lines_gib": {name: value / GiB for name, value in extra.items()},
            "plan_with_reference_lines_gib": adjusted / GiB, "adjusted_ratio": adjusted / GiB / ref.gib}
