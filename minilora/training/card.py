"""The adapter's model card (README.md), in the shape of the card of the recipe's source
(https://github.com/amit-chaubey/finetune-LoRA-4bit), every field filled with what the run really did."""

import json

CARD = """---
base_model: {base_model}
library_name: peft
tags:
- minilora
- lora
- qlora
---

# Model Card for a LoRA adapter of {base_model}

A LoRA (Low-Rank Adaptation) adapter for `{base_model}`, trained by minilora on a {quant_words} base
model. It loads with PEFT's `PeftModel.from_pretrained` onto the original base model.

---

## Model Details

### Model Description

This adapter adapts {base_model} with LoRA, a parameter-efficient fine-tuning technique, over
{quant_words} base weights for reduced memory use during training.

- **Developed by:** minilora (`train.py`)
- **Model type:** Causal language model, LoRA adapter{quant_type}
- **Finetuned from model:** {base_model}
- **Trainable parameters:** {trainable}

### Model Sources

- **Paper:** https://arxiv.org/abs/2106.09685 (LoRA), https://arxiv.org/abs/2305.14314 (QLoRA)

---

## Uses

### Direct Use

Instruction following on data like the training file below; research and education.

### Out-of-Scope Use

- Not suitable for real-time safety-critical applications.
- Not intended for generating harmful, biased, or misleading content.

---

## Bias, Risks, and Limitations

The adapter may reflect biases present in the base model and in the training data. Review outputs
before use in production.

---

## How to Get Started with the Model

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

base_model = "{base_model}"
lora_adapter = "{adapter_path}"

model = AutoModelForCausalLM.from_pretrained(base_model)
model = PeftModel.from_pretrained(model, lora_adapter)
tokenizer = AutoTokenizer.from_pretrained(base_model)

prompt = "The weather is good today."
inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
outputs = model.generate(**inputs)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
```

---

## Training Details

### Training Data

- File: `{data}` ({data_format} format, {n_lines} lines, sha256 `{data_sha}`)
- Training examples: {n_train} ({n_train_tokens} tokens, {n_target_tokens} of them trained on)
- Held-out examples: {n_eval} ({eval_source})
- Truncated to {seq_len} tokens: {n_truncated} examples{skipped}

### Training Procedure

- LoRA rank: {r}
- LoRA alpha: {alpha}{rslora}
- LoRA dropout: {dropout}
- Target modules: {targets}{variants}
- Quantization: {quant_line}
- Precision: {precision}
- Optimizer: AdamW (lr {lr}, {warmup} warm-up steps, cosine decay), batch {batch_size} x {grad_accum} accumulation
- Optimizer steps: {steps} ({epochs:.2f} epochs){packing}{resumes}
- Gradient checkpointing: {recompute}

#### Speeds, Sizes, Times

- Model size: {total_params} parameters ({share} trainable)
- Training time: {wall_time}
- Throughput: {tokens_per_s} tokens/s

---

## Evaluation

### Testing Data, Factors & Metrics

- Held-out data: {eval_source}.
- Metrics: loss and perplexity on the held-out response tokens.

### Results

| | held-out loss | perplexity |
|---|---|---|
| before training | {loss_before} | {ppl_before} |
| after training | {loss_after} | {ppl_after} |

---

## Environmental Impact

- **Hardware Type:** {hardware}
- **Hours used:** {hours}

---

## Technical Specifications

### Model Architecture and Objective

- Base: {base_model} ({architecture}), causal language modelling
- LoRA fine-tuning with minilora; loss on response tokens only
- Software: {versions}
"""


def _resume_lines(resumes: list[dict]) -> str:
    lines = []
    for r in resumes:
        changes = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in r["changed"].items())
        lines.append(f"\n- Resumed at step {r['step']}" + (f", changing {changes}" if changes else ""))
    return "".join(lines)


def _recompute_words(mode: str, every: int) -> str:
    if mode == "none":
        return "off"
    return f"{mode} recompute, " + ("every decoder layer" if every == 1 else f"one decoder layer in {every}")


def _fmt(value, digits=4):
    return "n/a" if value is None else f"{value:.{digits}f}"


INIT_WORDS = {"loftq": "LoftQ, one step (https://arxiv.org/abs/2310.08659): B A fits the 4-bit quantization error",
              "pissa": "PiSSA (https://arxiv.org/abs/2404.02948): B A = the top-r singular part of W",
              "olora": "OLoRA (https://arxiv.org/abs/2406.01775): B A from W's QR"}


def _init_line(run: dict) -> str:
    init = run.get("init") or {}
    method = init.get("method", "zeros")
    if method == "zeros":
        return ""
    line = f"\n- LoRA init: `{method}` ({INIT_WORDS[method.partition(':')[0]]})"
    if init.get("converted"):
        line += (f"; trained over the 4-bit W - scale * B0 A0, saved converted to a plain LoRA of the ordinary "
                 f"4-bit base (r={init['saved_r']}, lora_alpha={init['saved_alpha']:g}: lora_A = [A; A0], "
                 "lora_B = [B, -B0], as PEFT's `path_initial_model_for_weight_conversion` writes it)")
    else:
        line += "; the base is the ordinary 4-bit base, the adapter a plain LoRA"
    return line


def _variants(cfg: dict, run: dict) -> str:
    """Lines for the init, DoRA and LoRA+, when the run used them."""
    lines = _init_line(run)
    if cfg.get("dora"):
        lines += "\n- DoRA: yes (weight-decomposed LoRA, https://arxiv.org/abs/2402.09353; `use_dora: true`)"
    if cfg.get("lora_plus_ratio", 1.0) != 1.0:
        lines += (f"\n- LoRA+ ratio: {cfg['lora_plus_ratio']:g} (B's learning rate = {cfg['lora_plus_ratio']:g} x A's, "
                  "https://arxiv.org/abs/2402.12354)")
    return lines


def render_card(run: dict, adapter_path: str) -> str:
    """`run` is run.json's content plus the 'result' section written at the end of training."""
    cfg, data, result = run["config"], run["data"], run["result"]
    before, after = result.get("eval_before") or {}, result.get("eval_after") or {}
    quant = cfg["quant"]
    quant_words = {"nf4": "4-bit NF4 (double-quantized)", "fp4": "4-bit FP4", "none": "full-precision"}[quant]
    if quant == "nf4" and not run.get("double_quant", True):
        quant_words = "4-bit NF4"
    wall = result["wall_time_s"]
    return CARD.format(
        base_model=cfg["model"], adapter_path=adapter_path, quant_words=quant_words,
        quant_type=f", {quant_words} base" if quant != "none" else "",
        trainable=result["trainable_summary"], data=cfg["data"], data_format=data["format"],
        n_lines=data["n_lines"], data_sha=data["sha256"][:16], n_train=data["n_train"],
        n_train_tokens=f"{data['n_train_tokens']:,}", n_target_tokens=f"{data['n_train_target_tokens']:,}",
        n_eval=data["n_eval"], eval_source=data["eval_source"], seq_len=cfg["seq_len"],
        n_truncated=data["n_truncated"],
        skipped=f"; skipped lines: {data['n_skipped']}" if data.get("n_skipped") else "",
        r=cfg["r"], alpha=f"{cfg['alpha']:g}", rslora=" (rsLoRA: scale alpha/sqrt(r))" if cfg["rslora"] else "",
        dropout=cfg["dropout"], targets=json.dumps(result["target_modules"]), variants=_variants(cfg, run),
        quant_line=quant_words + (", compute " + run["compute_dtype"] if quant != "none" else ""),
        precision=run["precision"], lr=cfg["lr"], warmup=result["warmup_steps"],
        batch_size=cfg["batch_size"], grad_accum=cfg["grad_accum"], steps=result["steps"],
        epochs=result["epochs_done"],
        packing=", packed sequences" if cfg["packing"] else ", padded batches" if cfg.get("padding") else
        ", padding-free batches",
        resumes=_resume_lines(run.get("resumes", [])),
        recompute=_recompute_words(run.get("recompute", {}).get("mode", cfg.get("recompute", "full")),
                                   cfg["recompute_every"]),
        total_params=f"{result['total_params']:,}", share=result["trainable_share"],
        wall_time=f"{wall:.1f} s" if wall < 120 else f"{wall / 60:.1f} min",
        tokens_per_s=f"{result['tokens_per_s']:,.0f}",
        loss_before=_fmt(before.get("loss")), ppl_before=_fmt(before.get("ppl"), 2),
        loss_after=_fmt(after.get("loss")), ppl_after=_fmt(after.get("ppl"), 2),
        hardware=run["hardware"], hours=f"{wall / 3600:.3f}", architecture=run["architecture"],
        versions=", ".join(f"{k} {v}" for k, v in run["versions"].items()),
    )
