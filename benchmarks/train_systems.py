"""The training benchmark's child side: one system (ours, ref_loop or trainer) built, trained and measured
in its own process.

    ours      minilora.load_base + add_lora + enable_recompute, loss_sum, the hand-written step (hand_loop)
    ref_loop  transformers 4-bit + prepare_model_for_kbit_training + PEFT LoRA, the model's own loss, the
              SAME hand-written step
    trainer   the same reference model trained by transformers.Trainer

bench_train.py starts `bench_train.py --child SYSTEM --spec FILE --child-out FILE`, which calls child_main;
the tests call run_system in process. Imports only torch and the standard library at the top: each system's
library imports happen inside it, so they count towards its time to first step.
"""

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
from train_setup import LORA, MAX_GRAD_NORM, synthetic_tokens


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


def hand_loop(spec: dict, params: list, loss_fn, batches: list, meter: Meter) -> dict | None:
    """The step `ours` and `ref_loop` share: AdamW (fused on CUDA, foreach on CPU, as minilora.training.loop),
    constant lr, grad clipping at 1.0. Dropout is re-seeded per step, so all systems draw the same masks.
    With spec["profile"], two more steps (not timed, losses not kept) run under the profiler: returned."""
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
    if not (spec.get("profile") and batches):
        return None
    from step_profile import profile_step

    meter.freeze_peak_memory()  # the profiler's own buffers are not the system's memory
    torch.manual_seed(spec["seed"] + len(batches))
    try:
        return profile_step(lambda: step(batches[-1]), meter.device)
    except Exception as err:  # noqa: BLE001 - the profile is extra: it must not cost the measured steps
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def device_batches(spec: dict, device: torch.device) -> list[dict]:
    ids = synthetic_tokens(spec["vocab"], spec["seq"], spec["batch"], spec["steps"], spec["seed"])
    # Every token is a target (labels = inputs); the loss is the mean over the B*(T-1) shifted targets.
    return [{"input_ids": x.to(device), "labels": x.to(device), "attention_mask": torch.ones_like(x).to(device)}
            for x in ids]


def run_ours(spec: dict, meter: Meter) -> dict:
    import minilora
    from minilora.data.batching import Batch
    from minilora.training.loss import CHUNK_ROWS, loss_sum
    from minilora.training.recompute import enable_recompute

    device = meter.device
    dtype = torch.float32 if spec["precision"] == "fp32" else torch.bfloat16
    t0 = time.perf_counter()
    model = minilora.load_base(spec["model_dir"], quant="nf4", compute_dtype=dtype, device=device)
    torch.manual_seed(spec["seed"])
    minilora.add_lora(model, **LORA)
    # The references start from exactly these weights (A kaiming-uniform, B zero).
    minilora.save_adapter(model, spec["init_dir"])
    enable_recompute(model)
    model.train()
    params = minilora.lora_parameters(model)
    load_s = time.perf_counter() - t0
    mem = meter.reset_peak_memory()
    seq = spec["seq"]
    positions = torch.arange(seq, device=device).expand(spec["batch"], seq)
    batches = [Batch(b["input_ids"], b["labels"], b["attention_mask"], positions, spec["batch"] * (seq - 1),
                     spec["batch"] * seq, ()) for b in device_batches(spec, device)]
    profile = hand_loop(spec, params, lambda b: loss_sum(model, b) / b.n_target_tokens, batches, meter)
    return {"load_s": load_s, **mem, "trainable": sum(p.numel() for p in params), "profile": profile,
            "loss_path": f"minilora.training.loss.loss_sum: target rows of the hidden states -> lm_head + CE in "
                         f"{CHUNK_ROWS}-row chunks under checkpointing, never the full logits"}


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
    model = get_peft_model(model, lora)
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
    load_s = time.perf_counter() - t0
    mem = meter.reset_peak_memory()
    profile = hand_loop(spec, params, lambda b: model(**b).loss, device_batches(spec, meter.device), meter)
    return {"load_s": load_s, **mem, "trainable": sum(p.numel() for p in params), "profile": profile,
            "loss_path": "model(input_ids, attention_mask, labels).loss: full logits, mean CE"}


def run_trainer(spec: dict, meter: Meter) -> dict:
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = meter.device.type == "cuda"
    t0 = time.perf_counter()
    model = reference_model(spec, meter.device)
    load_s = time.perf_counter() - t0
    # One dataset row per sequence; the sequential sampler rebuilds the hand-written loop's batches.
    rows = [{k: v[i] for k, v in b.items()} for b in device_batches(spec, torch.device("cpu"))
            for i in range(spec["batch"])]

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.manual_seed(spec["seed"] + state.global_step)  # the masks the hand-written loop draws
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
            return SequentialSampler(self.train_dataset)  # the rows in order: the hand-written loop's batches

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
            "train_runtime_s": output.metrics.get("train_runtime"),
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
