"""The training benchmark's child side: one system (ours, ref_loop or trainer) built, trained and measured
in its own process.

    ours      minilora's own loop: minilora.training.loop.TrainingLoop.train_step, with the model and loop
              built as minilora.training.job builds them (benchmarks.ours) from the recipe's TrainConfig
    ref_loop  transformers 4-bit + prepare_model_for_kbit_training + PEFT LoRA, the model's own loss, a
              hand-written reference step (reference_loop: AdamW, clipping, constant lr)
    trainer   the same reference model trained by transformers.Trainer

All three train on the same batches (the references build them with minilora.data.batching.make_batches,
the call ours' loop makes; a digest of each system's batches is recorded and compared), from the same
initial LoRA weights (ours saves them, the references copy them in), at the same constant lr, with
`torch.manual_seed(seed + step)` before every step so all draw the same dropout masks.

benchmarks.throughput starts `python -m benchmarks.throughput --child SYSTEM --spec FILE --child-out FILE`, which
calls child_main; the tests call run_system in process. Imports only torch and the standard library at the
top: each system's library imports happen inside it, so they count towards its time to first step.
"""

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from .harness import draw_masks_as_minilora
from .throughput_setup import LORA, MAX_GRAD_NORM, batches_digest, synthetic_examples


class Meter:
    """Step times (device-synchronised), losses and peak memory of one system."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t_start = time.perf_counter()
        self.step_s, self.losses = [], []
        self.t_first_step_end = None
        self._t0 = None
        self._frozen_peak = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self):
        self.sync()
        self._t0 = time.perf_counter()

    def end(self):
        self.sync()
        now = time.perf_counter()
        self.step_s.append(now - self._t0)
        if self.t_first_step_end is None:
            self.t_first_step_end = now

    def reset_peak_memory(self) -> dict:
        """Called once the model is ready: the peaks then cover training only. Returns memory after loading."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return {"allocated_after_load_mib": torch.cuda.memory_allocated(self.device) / 2**20}
        after = _proc_status_mib("VmRSS")
        with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM (peak RSS) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        return {"rss_after_load_mib": after, "peak_rss_load_mib": _proc_status_mib("VmHWM")}

    def freeze_peak_memory(self) -> None:
        """Later peak_memory() calls return the peaks as they are now (before an extra, profiled step)."""
        self._frozen_peak = self.peak_memory()

    def peak_memory(self) -> dict:
        if self._frozen_peak is not None:
            return self._frozen_peak
        if self.device.type == "cuda":
            return {"peak_allocated_mib": torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "peak_reserved_mib": torch.cuda.max_memory_reserved(self.device) / 2**20}
        return {"peak_rss_mib": _proc_status_mib("VmHWM")}


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else None


def autocast(spec: dict):
    if spec["precision"] == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(spec["device"].split(":")[0], dtype=torch.bfloat16)


def profile_extra(spec: dict, step, meter: Meter) -> dict | None:
    """With spec["profile"], two more steps of `step()` (after the timed ones, losses not kept) under
    torch.profiler: where a step's time goes, by category. None without."""
    if not spec.get("profile"):
        return None
    from .step_profile import profile_step

    meter.freeze_peak_memory()  # the profiler's own buffers are not the system's memory
    torch.manual_seed(spec["seed"] + spec["steps"])
    try:
        return profile_step(step, meter.device)
    except Exception as err:  # noqa: BLE001 - the profile is extra: it must not cost the measured steps
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def recipe_config(spec: dict):
    """The benchmark's recipe as minilora's TrainConfig: constant lr (no warm-up, cosine floor 1.0), one
    micro-batch per step, padded batching and full recompute of every decoder layer (what the references do:
    same batches, like-for-like checkpointing; benchmarks.epoch measures the padding-free and selective
    defaults), no evaluation or checkpoints inside the timed steps."""
    from minilora.training.config import TrainConfig

    return TrainConfig(model=spec["model_dir"], output=str(Path(spec["work_dir"]) / "ours-run"), r=LORA["r"],
                       alpha=LORA["alpha"], dropout=LORA["dropout"], batch_size=spec["batch"], grad_accum=1,
                       max_steps=spec["steps"], lr=spec["lr"], warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                       max_grad_norm=MAX_GRAD_NORM, seq_len=spec["seq"], packing=False, padding=True, recompute="full",
                       eval_fraction=0.0, eval_every=0, save_every=0, seed=spec["seed"], precision=spec["precision"],
                       optim="adamw")


def run_ours(spec: dict, meter: Meter) -> dict:
    from minilora.training.loss import CHUNK_ROWS

    from .ours import CODE_PATH, build_loop, build_model, replay_last_batch

    device, cfg = meter.device, recipe_config(spec)
    t0 = time.perf_counter()
    # The references start from exactly these initial LoRA weights (A kaiming-uniform, B zero).
    model = build_model(cfg, device, spec["precision"], init_dir=spec["init_dir"])
    loop = build_loop(model, cfg, synthetic_examples(spec), device, spec["precision"], spec["pad_id"])
    load_s = time.perf_counter() - t0
    mem = meter.reset_peak_memory()
    for i in range(spec["steps"]):
        torch.manual_seed(spec["seed"] + i)
        meter.begin()
        record = loop.train_step()
        meter.end()
        meter.losses.append(record["loss"] if record["loss"] is not None else math.nan)
    profile = profile_extra(spec, lambda: replay_last_batch(loop), meter)
    return {"load_s": load_s, **mem, "trainable": sum(p.numel() for p in loop.params), "profile": profile,
            "code_path": CODE_PATH, "batches_sha256": batches_digest(loop.stream.batches(0)),
            "loss_path": f"minilora.training.loss.loss_sum: target rows of the hidden states -> lm_head + CE in "
                         f"{CHUNK_ROWS}-row chunks under checkpointing, never the full logits"}


def reference_batches(spec: dict) -> list:
    """The batches ours' loop trains on, built by the same call (minilora.data.batching.make_batches)."""
    from minilora.data.batching import make_batches

    return make_batches(synthetic_examples(spec), spec["batch"], 0, spec["seed"], spec["pad_id"])


def reference_loop(spec: dict, params: list, loss_fn, batches: list, meter: Meter) -> dict | None:
    """The reference's hand-written step: AdamW (fused on CUDA, foreach on CPU, as minilora's make_optimizer),
    constant lr, grad clipping at 1.0, dropout re-seeded per step. Returns the extra steps' profile."""
    cuda = meter.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0, fused=cuda or None,
                            foreach=None if cuda else True)

    def step(batch):
        with autocast(spec):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i, batch in enumerate(batches):
        torch.manual_seed(spec["seed"] + i)
        meter.begin()
        loss = step(batch)
        meter.end()
        meter.losses.append(loss.item())
    return profile_extra(spec, lambda: step(batches[-1]), meter) if batches else None


def reference_model(spec: dict, device: torch.device):
    """What a user runs: transformers 4-bit loading, prepare_model_for_kbit_training, PEFT LoRA."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import minilora

    dtype = torch.float32 if spec["precision"] == "fp32" else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})
    if device.type == "cpu":
        # As minilora.load_base does: no in-place repack of 4-bit weights on AVX512-BF16 CPUs, so both
        # sides compute the same thing (the repack only serves no-grad inference).
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      target_modules=list(minilora.DEFAULT_TARGETS), task_type="CAUSAL_LM")
    # Same masks as ours (the losses are compared step by step): on a CPU this reference draws them by
    # minilora's cheaper law, not nn.Dropout's (minilora/dropout.py); on CUDA both are F.dropout.
    model = draw_masks_as_minilora(get_peft_model(model, lora))
    copy_initial_lora(model, spec["init_dir"])
    model.train()
    return model


def copy_initial_lora(model, init_dir: str) -> None:
    """ours' initial LoRA weights (PEFT-keyed, no adapter name) into PEFT's `.default` slots; all or nothing."""
    from safetensors.torch import load_file

    from minilora.adapter import WEIGHTS_NAME

    saved = load_file(str(Path(init_dir) / WEIGHTS_NAME))
    state = model.state_dict()
    slots = {k: k.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight",
                                                                              ".lora_B.weight")
             for k in state if ".lora_A.default." in k or ".lora_B.default." in k}
    if sorted(slots.values()) != sorted(saved):
        raise RuntimeError(f"initial LoRA keys differ: {len(saved)} saved by ours, {len(slots)} in PEFT's model")
    with torch.no_grad():
        for key, ours_key in slots.items():
            state[key].copy_(saved[ours_key])


def run_ref_loop(spec: dict, meter: Meter) -> dict:
    t0 = time.perf_counter()
    model = reference_model(spec, meter.device)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = reference_batches(spec)
    load_s = time.perf_counter() - t0
    mem = meter.reset_peak_memory()
    inputs = [{"input_ids": b.input_ids.to(meter.device), "attention_mask": b.attention_mask.to(meter.device),
               "labels": b.labels.to(meter.device)} for b in batches]
    profile = reference_loop(spec, params, lambda b: model(**b).loss, inputs, meter)
    return {"load_s": load_s, **mem, "trainable": sum(p.numel() for p in params), "profile": profile,
            "code_path": "benchmarks.throughput_systems.reference_loop (hand-written AdamW step) over transformers "
                         "4-bit + PEFT", "batches_sha256": batches_digest(batches),
            "loss_path": "model(input_ids, attention_mask, labels).loss: full logits, mean CE"}


def run_trainer(spec: dict, meter: Meter) -> dict:
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = meter.device.type == "cuda"
    t0 = time.perf_counter()
    model = reference_model(spec, meter.device)
    load_s = time.perf_counter() - t0
    batches = reference_batches(spec)
    # One dataset row per sequence; the sequential sampler rebuilds the batches in order.
    rows = [{"input_ids": b.input_ids[i], "attention_mask": b.attention_mask[i], "labels": b.labels[i]}
            for b in batches for i in range(b.input_ids.shape[0])]

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.manual_seed(spec["seed"] + state.global_step)  # the masks the other systems draw
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.end()

    step_losses = []

    class LossRecorder(Trainer):
        """Keeps each step's exact loss (the log history rounds it)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            step_losses.append(loss)
            return loss

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # the rows in order: the other systems' batches

    # Newer transformers renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = TrainingArguments(
        output_dir=str(Path(spec["work_dir"]) / "trainer"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=spec["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=spec["precision"] == "bf16",
        **{ckpt: True, f"{ckpt}_kwargs": {"use_reentrant": False}}, dataloader_pin_memory=cuda,
        use_cpu=not cuda, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, seed=spec["seed"])
    trainer = LossRecorder(model=model, args=args, train_dataset=rows, callbacks=[StepClock()])
    mem = meter.reset_peak_memory()
    output = trainer.train()
    meter.losses = [loss.item() for loss in step_losses]
    return {"load_s": load_s, **mem, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "train_runtime_s": output.metrics.get("train_runtime"), "batches_sha256": batches_digest(batches),
            "code_path": "transformers.Trainer.train over the same transformers 4-bit + PEFT model",
            "loss_path": "Trainer.compute_loss -> model(..., labels).loss: full logits, CE normalised by the "
                         "target count; optimizer " + args.optim}


def run_system(system: str, spec: dict) -> dict:
    """One system, in this process: its result with step times, losses and memory (status OOM on OOM)."""
    torch.set_num_threads(spec["threads"])
    meter = Meter(torch.device(spec["device"]))
    result = {"system": system, "status": "ok"}
    try:
        result.update({"ours": run_ours, "ref_loop": run_ref_loop, "trainer": run_trainer}[system](spec, meter))
    except torch.OutOfMemoryError as err:
        result.update(status="OOM", error=str(err).splitlines()[0])
    result.update(meter.peak_memory(), step_s=meter.step_s, losses=meter.losses,
                  tokens_per_step=spec["batch"] * spec["seq"])
    if meter.t_first_step_end is not None:
        result["time_to_first_step_s"] = meter.t_first_step_end - meter.t_start
    return result


def child_main(system: str, spec_path: str, out_path: str) -> int:
    result = run_system(system, json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0
