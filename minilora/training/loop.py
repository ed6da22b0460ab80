"""The training loop: accumulation, mixed precision, clipping, evaluation, checkpoints, resume.

One optimizer step = `grad_accum` micro-batches; each micro-batch's summed loss is divided by the
target-token count of the whole step, so every target token weighs the same however the tokens
fall into micro-batches. The learning rate is a pure function of the step (schedule.lr_at), and
the data position is (epoch, batch index): a checkpoint holds everything the next step depends on,
so a resumed run on a CPU reproduces the uninterrupted one bit for bit.
"""

import contextlib
import copy
import math
import resource
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minilora.adapter import load_adapter, save_adapter
from minilora.cli_runner import EXIT_OUT_OF_MEMORY, first_line, is_out_of_memory
from minilora.data.batching import Batch, make_batches, make_padding_free_batches
from minilora.errors import UserError, shown
from minilora.inject import lora_layers, lora_parameters
from minilora.training.checkpoint import (
    load_training_state,
    remove_checkpoints_after,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from minilora.training.config import TrainConfig
from minilora.training.distributed import DistInfo, all_reduce_sum, any_rank, gather_objects, shard, wrap
from minilora.training.evaluate import evaluate
from minilora.training.fsdp import full, gathered_adapter, local, shard_for_training
from minilora.training.lora_stats import LoRAStats
from minilora.training.loss import LossModule
from minilora.training.metrics import METRICS_NAME, append_metric, truncate_metrics
from minilora.training.optim import lora_plus_groups, make_optimizer
from minilora.training.schedule import lr_at
from minilora.training.sharded_checkpoint import load_sharded_tensors, save_sharded_checkpoint


class TrainingStopped(Exception):
    """The run stopped before the end, with everything saved; `exit_code` for the CLI."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def epoch_batches(examples, cfg: TrainConfig, epoch: int, pad_id: int, world: int = 1) -> Sequence[Batch]:
    """The global micro-batches of one epoch in the layout the config chooses: padding-free (one row
    of up to batch_size examples and batch_tokens tokens per rank), padded (batch_size examples per
    rank) or packed (batch_size rows of seq_len per rank)."""
    if cfg.padding or cfg.packing:
        return make_batches(examples, cfg.batch_size * world, epoch, cfg.seed, pad_id, packing=cfg.packing,
                            seq_len=cfg.seq_len)
    return make_padding_free_batches(examples, cfg.batch_size, _token_budget(cfg), epoch, cfg.seed, pad_id,
                                     rows_per_batch=world)


def _token_budget(cfg: TrainConfig) -> int:
    """A padding-free row's token budget: --batch-tokens, or batch_size x seq_len."""
    return cfg.batch_tokens or cfg.batch_size * cfg.seq_len


def max_micro_batch_tokens(cfg: TrainConfig) -> int:
    """The most tokens (pads included) one rank's micro-batch of `epoch_batches` can hold."""
    rows = cfg.batch_size * cfg.seq_len  # batch_size examples (or rows) of at most seq_len tokens
    if cfg.padding or cfg.packing:
        return rows
    return min(rows, max(_token_budget(cfg), cfg.seq_len))  # a row may hold one example over the budget


class BatchStream:
    """Global micro-batches (one per step of every rank) in training order across epochs;
    the position is (epoch, index)."""

    def __init__(self, examples, cfg: TrainConfig, pad_id: int, world: int):
        self.examples, self.cfg, self.pad_id, self.world = examples, cfg, pad_id, world
        self.epoch, self.index = 0, 0
        self._cache: tuple[int, Sequence[Batch]] | None = None

    def batches(self, epoch: int) -> Sequence[Batch]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_batches(self.examples, self.cfg, epoch, self.pad_id, self.world))
        return self._cache[1]

    def next(self) -> Batch:
        if self.index >= len(self.batches(self.epoch)):
            self.epoch, self.index = self.epoch + 1, 0
        batch = self.batches(self.epoch)[self.index]
        self.index += 1
        return batch

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def epochs_done(self) -> float:
        return self.epoch + self.index / max(1, len(self.batches(self.epoch)))


class StopRequest:
    """SIGINT/SIGTERM for the whole job (installed by job.py around everything it does): the first asks
    the job to stop at the next safe point (after the current step, with a checkpoint; before training,
    at once); a second SIGINT interrupts at once (writes are atomic, so nothing on disk is corrupted)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        tqdm.write(f"\n{self.signal_name}: stopping at the next safe point, with everything saved "
                   "(Ctrl-C again to quit at once)")

    @property
    def exit_code(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    eval_before: dict | None = None
    eval_last: dict | None = None
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    step_tokens: list = field(default_factory=list)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def total_steps(cfg: TrainConfig, n_batches: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_batches / cfg.grad_accum))


class TrainingLoop:
    """Holds what the steps share; `run()` is the loop."""

    def __init__(self, model, cfg: TrainConfig, *, train_examples, eval_batches: list[Batch], pad_id: int,
                 device: torch.device, precision: str, fingerprint: dict, dist: DistInfo | None = None,
                 stop: StopRequest | None = None):
        """The optimizer, scaler, batch stream and schedule of one training run.

        model           the 4-bit base with LoRA layers, on `device`; only its LoRA parameters train
        cfg             the run's resolved TrainConfig (steps, batches, optimizer, checkpoints, output)
        train_examples  the training examples (data.dataset's records: token ids and loss masks)
        eval_batches    the held-out set, already batched ([] for no evaluation)
        pad_id          the tokenizer's pad id (padded and packed layouts fill with it)
        device          where the model is and batches go
        precision       "fp32", "bf16" or "fp16" (autocast dtype; fp16 adds a grad scaler)
        fingerprint     what a resume must match, saved in each checkpoint (job.fingerprint)
        dist            this process's rank and world (None: one process)
        stop            the request that SIGINT/SIGTERM handlers set (None: a fresh one, never set)
        """
        dist = dist or DistInfo()
        self.stop = stop or StopRequest()  # job.py installs its signal handlers for the whole job
        self.model, self.cfg, self.device, self.precision, self.dist = model, cfg, device, precision, dist
        self.eval_batches, self.fingerprint = eval_batches, fingerprint
        self.output = Path(cfg.output)
        self.sharded = cfg.fsdp
        if self.sharded:  # FSDP2 replaces the parameters with sharded ones: the optimizer is built over those
            self.loss_module = shard_for_training(LossModule(model, [], device, sharded=True), model, device,
                                                  precision, cfg.fsdp_offload)
        else:
            # DDP over LoRA, world > 1
            self.loss_module = wrap(LossModule(model, lora_parameters(model), device), dist)
        self.params = lora_parameters(model)
        groups = (lora_plus_groups(lora_layers(model).values(), cfg.lr, cfg.lora_plus_ratio)
                  if cfg.lora_plus_ratio != 1 else self.params)
        self.optimizer = make_optimizer(cfg.optim, groups, cfg.lr, cfg.weight_decay, device)
        self.lora_stats = LoRAStats(model, cfg.log_lora_stats) if cfg.log_lora_stats else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.stream = BatchStream(train_examples, cfg, pad_id, world=dist.world)
        self.total = total_steps(cfg, len(self.stream.batches(0)))
        # Warm-up longer than half the run would leave no decay: cap it (the card reports the value used).
        self.warmup = min(cfg.warmup_steps, self.total // 2)
        self.state = LoopState()
        self._rollback_point: dict | None = None

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    # --- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path:
        """Collective: every rank contributes its RNG states; rank 0 writes."""
        extra = {"data_position": self.stream.position(), "tokens_seen": self.state.tokens_seen,
                 "eval_before": self.state.eval_before, "eval_last": self.state.eval_last,
                 "rng_per_rank": gather_objects(rng_states(), self.dist)}
        path = self.output / "checkpoints" / f"step-{self.state.step}"
        self.check_weights(f"checkpoint {path}")
        if self.sharded:  # every rank writes its shards
            save_sharded_checkpoint(self.output, self.state.step, self.model, self.optimizer,
                                    {"scaler": self.scaler.state_dict(), **extra}, self.fingerprint,
                                    self.cfg.keep_checkpoints)
        elif self.dist.main:
            save_checkpoint(self.output, self.state.step, self.model, self.optimizer, self.scaler, extra,
                            self.fingerprint, self.cfg.keep_checkpoints)
        return path

    def save_adapter(self, folder: Path) -> None:
        """Collective under --fsdp (the sharded LoRA weights are gathered); rank 0 writes the adapter files."""
        with gathered_adapter(self.model) if self.sharded else contextlib.nullcontext():
            if self.dist.main:
                save_adapter(self.model, folder, self.cfg.model)

    def restore(self, folder: Path) -> None:
        if self.sharded:
            load_sharded_tensors(folder, self.model, self.optimizer)
        else:
            load_adapter(self.model, folder)
        saved = load_training_state(folder)
        try:
            self._apply_saved(saved)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            # The manifest's checksums passed, so the file is as written, but not by this run's kind of loop.
            raise UserError(f"--resume: {folder}: the training state does not fit this run ({type(err).__name__}: "
                            f"{str(err)[:200]}); resume from an earlier checkpoint or start afresh with "
                            "--overwrite") from None
        if self.dist.main:
            truncate_metrics(self.output / METRICS_NAME, self.state.step)

    def _apply_saved(self, saved: dict) -> None:
        if not self.sharded:  # a sharded checkpoint's AdamW state is in its shards (restore loaded it)
            self.optimizer.load_state_dict(saved["optimizer"])
        for group in self.optimizer.param_groups:  # the saved groups carry the old value; it may be steered
            group["weight_decay"] = self.cfg.weight_decay
        self.scaler.load_state_dict(saved["scaler"])
        per_rank = saved["rng_per_rank"]
        # --fsdp resumed on more ranks than saved: the new ranks keep the seeding job.py gave them.
        if not self.sharded or self.dist.rank < len(per_rank):
            set_rng_states(per_rank[self.dist.rank])
        self.stream.epoch, self.stream.index = saved["data_position"]["epoch"], saved["data_position"]["index"]
        if self.sharded:  # a position counts global micro-batches of `world` rank rows: convert to this world
            rows = self.stream.index * saved["world"]
            if rows % self.dist.world:
                raise ValueError(f"the data position ({rows} rank micro-batches into the epoch) does not divide "
                                 f"among {self.dist.world} ranks")
            self.stream.index = rows // self.dist.world
        self.state.step, self.state.tokens_seen = saved["step"], saved["tokens_seen"]
        self.state.eval_before, self.state.eval_last = saved["eval_before"], saved["eval_last"]
        _check_saved_values(self)

    # --- logging ----------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if not self.dist.main:
            return
        append_metric(self.output / METRICS_NAME, record)

    def run_eval(self, label: str) -> dict | None:
        if not self.eval_batches:
            return None
        result = evaluate(self.model, self.eval_batches, self.autocast, self.dist,
                          self.loss_module if self.sharded else None, device=self.device)
        if not math.isfinite(result["loss"]):
            if label == "before":  # no update yet: the base model itself computes NaN or inf
                raise UserError(f"--model {self.cfg.model}: the held-out loss of the base model before training is "
                                f"{result['loss']} (its weights or config give non-finite numbers); check the model")
            raise TrainingStopped(f"the held-out loss is {result['loss']} at step {self.state.step} ({label} "
                                  f"evaluation): the adapter gives non-finite numbers and is not a result. Continue "
                                  f"from an earlier checkpoint with a lower learning rate: the same command plus "
                                  f"--resume --lr {self.cfg.lr / 4:g}", exit_code=1)
        self.state.eval_last = result
        self.log({"kind": "eval", "step": self.state.step, "loss": result["loss"], "ppl": result["ppl"],
                  "tokens": result["tokens"], "when": label})
        self.say(f"eval {label:>6} step {self.state.step}: loss {result['loss']:.4f}  ppl {result['ppl']:.2f}")
        return result

    # --- one optimizer step -----------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, state = self.cfg, self.state
        before = self._snapshot()
        lr = lr_at(state.step, cfg.lr, self.warmup, self.total, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+ groups carry their ratio
        micro = [self.stream.next() for _ in range(cfg.grad_accum)]
        n_targets = max(1, sum(b.n_target_tokens for b in micro))  # over the global batch, all ranks
        n_tokens = sum(b.n_tokens for b in micro)
        started = time.perf_counter()
        loss_total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            last_micro = i == len(micro) - 1
            # DDP and FSDP average gradients over ranks; scaling by world turns that average into the sum.
            with self._gradient_sync(last_micro):
                with self.autocast():
                    micro_loss = self.loss_module(shard(batch, self.dist))
                self.scaler.scale(micro_loss * (self.dist.world / n_targets)).backward()
            loss_total += micro_loss.detach()
        all_reduce_sum(loss_total, self.dist)
        self.scaler.unscale_(self.optimizer)
        stats_due = self.lora_stats is not None and self.lora_stats.due(state.step + 1)
        lora_grads = self.lora_stats.grad_norms() if stats_due else None  # unscaled, before clipping
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = full(torch.nn.utils.clip_grad_norm_(self.params, max_norm))  # sharded: over all ranks
        # One host sync per step: the loss and norm decide whether the step may be applied.
        loss, norm = (loss_total / n_targets).item(), grad_norm.item()
        finite = math.isfinite(loss) and math.isfinite(norm)
        scaler_skip = False
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step itself on inf/NaN gradients
            self.scaler.update()
            scaler_skip = finite is False or self.scaler.get_scale() < scale
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # A finite gradient can still give non-finite weights (an lr so large that the update overflows):
        # such an update is undone at once, as a bad step, so no later step or save ever sees it.
        weights_broken = finite and not scaler_skip and not self._weights_finite()
        if weights_broken:
            self._restore_params(before)
        elapsed = time.perf_counter() - started
        state.step += 1
        state.tokens_seen += n_tokens
        state.step_times.append(elapsed)
        state.step_tokens.append(n_tokens)
        record = {"kind": "train", "step": state.step, "loss": loss if math.isfinite(loss) else None,
                  "lr": lr, "grad_norm": norm if math.isfinite(norm) else None, "tokens": n_tokens,
                  "tokens_per_s": n_tokens / elapsed, "peak_mem_mb": round(peak_memory_mb(self.device), 1)}
        if not math.isfinite(loss):
            state.bad_steps += 1
            state.skipped_steps.append(state.step)
            record["skipped"] = "non-finite loss"
        elif not finite or scaler_skip:
            state.bad_steps = state.bad_steps + 1 if not finite and not self.scaler.is_enabled() else 0
            state.skipped_steps.append(state.step)
            record["skipped"] = "grad scaler: inf/NaN gradients" if scaler_skip else "non-finite gradients"
        elif weights_broken:
            state.bad_steps += 1
            state.skipped_steps.append(state.step)
            record["skipped"] = "non-finite weights after the update (undone)"
        else:
            state.bad_steps = 0
        if "skipped" not in record or self._rollback_point is None:
            self._rollback_point = before  # before the newest update (or before any bad step)
        if "skipped" in record:
            self.say(f"step {state.step}: {record['skipped']}; optimizer step skipped")
        self.log(record)
        if lora_grads is not None:
            self.log(self.lora_stats.record(state.step, lora_grads))
        return record

    def _gradient_sync(self, last_micro: bool):
        """Reduce gradients over ranks on the last micro-batch of a step only (accumulate locally before)."""
        if self.sharded:
            self.loss_module.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last_micro or not self.dist.enabled else self.loss_module.no_sync()

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> LoopState:
        cfg, state = self.cfg, self.state
        self.model.train()
        if state.step == 0 and state.eval_before is None:
            state.eval_before = self.run_eval("before")
        if self._stop_requested():  # during loading or the first evaluation: nothing new to save
            again = "--resume to continue" if state.step else "--overwrite to start afresh"
            raise TrainingStopped(f"{self.stop.signal_name or 'a signal on another rank'}: stopped before training "
                                  f"step {state.step + 1}; run the same command plus {again}",
                                  exit_code=self.stop.exit_code)
        first_step = state.step + 1
        bar = tqdm(total=self.total, initial=state.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not self.dist.main)
        try:
            while state.step < self.total:
                record = self._guarded_step()
                bar.update(1)
                bar.set_postfix(self._postfix(record), refresh=False)
                if state.bad_steps >= cfg.max_bad_steps:
                    path = self._save_rollback_point()
                    raise TrainingStopped(
                        f"{state.bad_steps} optimizer steps in a row had a non-finite loss or gradient "
                        f"(steps {state.skipped_steps[-state.bad_steps:]}); stopped without applying them. The state "
                        f"before the update that led to them is in {path}. Continue from it with a lower learning "
                        f"rate: the same command plus --resume --lr {cfg.lr / 4:g}; or check the data", exit_code=1)
                last = state.step == self.total
                if cfg.eval_every and state.step % cfg.eval_every == 0 and not last:
                    self.run_eval("during")
                if (cfg.save_every and state.step % cfg.save_every == 0) or last:
                    self.save()
                if not last and self._stop_requested():
                    path = self.save()
                    self.save_adapter(self.output)
                    name = self.stop.signal_name or "a signal on another rank"
                    raise TrainingStopped(
                        f"{name}: stopped at step {state.step}/{self.total}; checkpoint {path}. "
                        f"Continue with the same command plus --resume", exit_code=self.stop.exit_code)
        finally:
            bar.close()
        if state.step >= first_step and set(range(first_step, state.step + 1)) <= set(state.skipped_steps):
            raise TrainingStopped(  # fewer bad steps than --max-bad-steps, but not one update was applied
                f"none of the {state.step - first_step + 1} optimizer steps of this run could be applied (non-finite "
                f"loss, gradients or weights: steps {state.skipped_steps[-5:]}); the adapter is not a result. Start "
                f"again with a lower learning rate (the same command plus --overwrite --lr {self.cfg.lr / 4:g}) or "
                "check the data", exit_code=1)
        return state

    # --- after non-finite steps ----------------------------------------------------------------------
    def _snapshot(self) -> dict:
        """What the next step changes, copied (LoRA weights and AdamW state: ~3x the adapter's size)."""
        return {"params": [p.detach().clone() for p in self.params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "scaler": self.scaler.state_dict(),
                "rng": rng_states(), "position": self.stream.position(),
                "step": self.state.step, "tokens_seen": self.state.tokens_seen}

    def _save_rollback_point(self) -> Path:
        """Go back to before the update that preceded the non-finite steps (its weights are finite but
        led to them), drop newer checkpoints, and checkpoint that state: a resume with a lower --lr
        redoes that update."""
        point = self._rollback_point
        self._restore_params(point)
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(point["scaler"])
        set_rng_states(point["rng"])
        self.stream.epoch, self.stream.index = point["position"]["epoch"], point["position"]["index"]
        self.state.step, self.state.tokens_seen = point["step"], point["tokens_seen"]
        if self.dist.main:
            remove_checkpoints_after(self.output, self.state.step)
        return self.save()

    def _restore_params(self, point: dict) -> None:
        """The LoRA weights and optimizer state of a snapshot (`_snapshot`)."""
        with torch.no_grad():
            for p, saved in zip(self.params, point["params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(point["optimizer"])

    def _weights_finite(self) -> bool:
        """Collective: whether every rank's LoRA weights are all finite (one host sync)."""
        flags = torch.stack([torch.isfinite(local(p)).all() for p in self.params]).all()  # this rank's shards
        return not any_rank(not bool(flags), self.dist, self.device)

    def check_weights(self, what: str) -> None:
        """Refuse to write `what` from non-finite weights (the per-step check makes this a last line)."""
        if not self._weights_finite():
            raise TrainingStopped(f"the LoRA weights are not finite at step {self.state.step}; {what} was not "
                                  f"written. Start from the newest checkpoint with a lower learning rate: the "
                                  f"same command plus --resume --lr {self.cfg.lr / 4:g}", exit_code=1)

    def _stop_requested(self) -> bool:
        """Collective: every rank stops if any was signalled."""
        return any_rank(self.stop.signal_name is not None, self.dist, self.device)

    def _guarded_step(self) -> dict:
        try:
            return self.train_step()
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            batch = self.cfg.batch_size
            where = "GPU" if isinstance(err, torch.OutOfMemoryError) else "CPU"
            raise TrainingStopped(
                f"out of {where} memory at step {self.state.step + 1} (batch {batch}, --seq-len {self.cfg.seq_len}): "
                f"{first_line(err)}. Lower memory with --batch-size {max(1, batch // 2)} "
                f"--grad-accum {self.cfg.grad_accum * 2} (same effective batch), a shorter --seq-len or "
                "--recompute full --recompute-every 1 (least activation memory). Checkpoints written so far are "
                "intact; add --resume to continue",
                exit_code=EXIT_OUT_OF_MEMORY) from None

    def say(self, text: str) -> None:
        if self.dist.main:
            tqdm.write(text)

    def _postfix(self, record: dict) -> dict:
        post = {"loss": f"{record['loss']:.4f}" if record["loss"] is not None else "nan",
                "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
        if self.device.type == "cuda":
            post["mem"] = f"{record['peak_mem_mb'] / 1024:.1f}G"
        return post


def _check_saved_values(loop: "TrainingLoop") -> None:
    """What a restored state must hold for the loop to go on: counters that are counts, a data position inside
    its epoch, AdamW moments shaped like their weights, evaluations with finite numbers. A checkpoint from
    elsewhere could hold anything that decodes; a wrong value would fail steps later, or silently."""
    for name, value in (("step", loop.state.step), ("tokens_seen", loop.state.tokens_seen),
                        ("epoch", loop.stream.epoch), ("index", loop.stream.index)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
            raise ValueError(f"{name} is {shown(value)}, not a count")
    if loop.stream.index > len(loop.stream.batches(loop.stream.epoch)):
        raise ValueError(f"data position {loop.stream.index} is past its epoch's batches")
    for param, entry in loop.optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in entry and (not torch.is_tensor(entry[key]) or entry[key].shape != param.shape):
                raise ValueError(f"the optimizer's {key} does not have its weight's shape {list(param.shape)}")
    for name in ("eval_before", "eval_last"):
        value = getattr(loop.state, name)
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(value.get(k), (int, float)) and math.isfinite(value[k]) for k in ("loss", "ppl", "tokens"))):
            raise ValueError(f"{name} is {shown(value)}")
