"""The training loop. Side concerns (logging, validation, checkpoints) are hooks called after each step;
the step itself is DeepSpeed's (``train_batch`` for pipelines, forward/backward/step otherwise)."""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bigtrain import checkpoint, flops
from bigtrain.config import Config
from bigtrain.distributed import Dist
from bigtrain.metrics import MetricsWriter, console, format_duration
from bigtrain.reliability import (
    SpikeDetector,
    TrainingError,
    WallClock,
    agree,
    exit_signals,
    inject_process_faults,
    loss_multiplier,
)

Batch = dict[str, torch.Tensor]


@dataclass
class TrainState:
    """Everything the loop advances; saved with checkpoints."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0  # non-finite steps whose update was skipped
    skipped_batches: list[list[int]] = field(default_factory=list)  # [start, end) samples never replayed
    rollbacks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    lr: float
    seconds: float
    applied: bool = True  # False: the optimizer skipped the update (non-finite gradients, fp16 overflow)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GlobalBatch:
    """This rank's share of one global batch and the loss normalizer its micro-batches use."""

    micro_batches: list[Batch]  # grad_accum_steps micro-batches, still on the host
    tokens: torch.Tensor  # trained tokens (classification: example weight) of the whole global batch
    normalizer: torch.Tensor  # tokens / (micro-batches x data-parallel ranks), fp32, on the device


class Rollback(Exception):
    """Raised by a hook to reload the last checkpoint and skip the global batch that started at
    ``batch_start``."""

    def __init__(self, step: int, batch_start: int):
        super().__init__(f"rollback requested at step {step}")
        self.step, self.batch_start = step, batch_start


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _close(batches: Iterator[Batch]) -> None:
    """Stop a prefetching iterator's thread (plain iterators have nothing to stop)."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def _dp_mean(value: torch.Tensor) -> float:
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value = value / parallel_state.get_data_parallel_world_size()
    return float(value)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        dist: Dist,
        engine,
        make_train_batches: Callable[[int], Iterator[Batch]],
        make_valid_batches: Callable[[], Iterator[Batch]] | None = None,
        state: TrainState | None = None,
    ):
        self.cfg, self.dist, self.engine = cfg, dist, engine
        self.state = state or TrainState()
        self.pipeline = cfg.parallel.pipeline > 1
        self.make_train_batches, self.make_valid_batches = make_train_batches, make_valid_batches
        self.batches: Iterator[Batch] | None = None
        self._open_batches()
        self.metrics = MetricsWriter(
            cfg.train.run_dir, enabled=dist.is_main, tensorboard=cfg.logging.tensorboard
        )
        self.hooks: list[Callable[[Trainer, StepResult], None]] = [
            nonfinite_hook,
            log_hook,
            consensus_hook,
            eval_hook,
            checkpoint_hook,
            fault_injection_hook,
        ]
        t = cfg.train
        self.protect: tuple[str, ...] = ()  # checkpoint tags retention must keep (the one resumed from)
        self.last_saved_step: int | None = None
        self.stop_reason: str | None = None
        self.consecutive_skips = 0
        self.spikes = SpikeDetector(t.spike_sigma, t.spike_window, t.spike_min_history)
        self.clock = WallClock(t.max_minutes)
        self.loss_multiplier = 1.0  # debug injections only
        self.signals = exit_signals(t.exit_signal_save)  # SIGTERM/SIGUSR1: save at the step's end, exit 0
        if self.pipeline:
            self._inject_into_pipeline_loss()
        self.started = time.time()

    def _open_batches(self) -> None:
        """(Re)start the training batches at the current consumed-samples position."""
        if self.batches is not None:
            _close(self.batches)
        self.batches = self.make_train_batches(self.state.consumed_samples)

    def _inject_into_pipeline_loss(self) -> None:
        loss_fn = self.engine.module.loss_fn

        def scaled(outputs, labels):
            loss = loss_fn(outputs, labels)
            return loss if self.loss_multiplier == 1.0 else loss * self.loss_multiplier

        self.engine.module.loss_fn = scaled

    # ------------------------------------------------------------------ what the model is fed
    # Fine-tuning tasks override these two to feed other inputs (positions, document ids, class labels).
    def model_args(self, b: Batch) -> tuple:
        """Positional arguments of the (non-pipeline) model's forward, which returns the loss."""
        return b["tokens"], b["labels"], b["loss_mask"]

    def pipeline_item(self, b: Batch) -> tuple:
        """(inputs, labels) as DeepSpeed's pipeline engine wants them for one micro-batch."""
        return b["tokens"], (b["labels"], b["loss_mask"])

    def _pipeline_items(self, gb: GlobalBatch) -> Iterator[tuple]:
        """The pipeline engine's micro-batches, the normalizer riding with the labels to the last stage."""
        for b in gb.micro_batches:
            inputs, labels = self.pipeline_item(_to_device(b, self.dist.device))
            yield inputs, (*labels, gb.normalizer)

    def next_global_batch(self, batches: Iterator[Batch]) -> GlobalBatch:
        """This rank's ``grad_accum_steps`` micro-batches of the next global batch and their normalizer.

        The loss of a step is the mean over every trained token (``loss_mask``; classification: example
        weight) of the global batch, whatever the micro-batch size, accumulation, data or pipeline
        parallelism or packing (Megatron-core's per-token loss). So the global count is known before
        the first backward: this rank's micro-batches are read ahead (small token tensors), their
        ``loss_mask`` summed on the host and all-reduced over data-parallel ranks (one collective, no
        device value read on the host), and each micro-batch's loss is its token-loss sum divided by
        ``tokens / (grad_accum_steps x dp)``: DeepSpeed's division by the accumulation steps and its
        data-parallel gradient mean then make loss and gradient the global token mean. Every pipeline
        stage reads its micro-batches (the engine feeds the first and last), so all agree on the count.
        Raises StopIteration when ``batches`` has no complete global batch left."""
        from megatron.core import parallel_state

        micro = [next(batches) for _ in range(self.cfg.derived.grad_accum_steps)]
        tokens = torch.stack([b["loss_mask"].sum(dtype=torch.float64) for b in micro]).sum()
        tokens = tokens.to(self.dist.device, non_blocking=True)  # a blocking copy would wait for the GPU
        dp = parallel_state.get_data_parallel_world_size()
        if dp > 1:
            torch.distributed.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
        normalizer = (tokens.clamp(min=1) / (len(micro) * dp)).float()
        return GlobalBatch(micro, tokens, normalizer)

    def _forward_global_batch(self, gb: GlobalBatch, train: bool) -> float:
        """Run (and with ``train``, back-propagate and step) one global batch; returns its loss: the
        mean over its trained tokens, the same on every rank."""
        if self.pipeline:
            run = self.engine.train_batch if train else self.engine.eval_batch
            return float(run(data_iter=self._pipeline_items(gb)))  # averaged over DP by DeepSpeed
        total = torch.zeros((), device=self.dist.device)
        for b in gb.micro_batches:
            b = _to_device(b, self.dist.device)
            micro_loss = self.engine(*self.model_args(b), gb.normalizer)
            if train:
                if self.loss_multiplier != 1.0:
                    micro_loss = micro_loss * self.loss_multiplier
                self.engine.backward(micro_loss)
                self.engine.step()
            total += micro_loss.detach().float()
        return _dp_mean(total / len(gb.micro_batches))

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        lr = self.engine.get_lr()[0]  # the rate this step uses; the scheduler moves after the step
        skipped_before = self.engine.skipped_steps
        state = self.state
        self.loss_multiplier = loss_multiplier(
            self.cfg, self.dist.rank, state.step + 1, state.consumed_samples
        )
        loss = self._forward_global_batch(self.next_global_batch(self.batches), train=True)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            grad_norm = float(grad_norm)
            grad_norm = grad_norm if grad_norm >= 0 else math.nan  # DeepSpeed's -1: "not finite"
        return StepResult(
            loss=loss,
            grad_norm=grad_norm,
            lr=lr,
            seconds=time.perf_counter() - t0,
            applied=self.engine.skipped_steps == skipped_before,
        )

    def train(self) -> TrainState:
        cfg = self.cfg
        try:
            while self.state.step < cfg.train.steps and self.stop_reason is None:
                self._skip_recorded_batches()
                result = self.train_step()
                self.state.step += 1
                self.state.consumed_samples += cfg.train.global_batch_size
                self.clock.observe_step(result.seconds)
                try:
                    for hook in self.hooks:
                        hook(self, result)
                except Rollback as rollback:
                    self.roll_back(rollback)
        finally:
            _close(self.batches)
            self.metrics.close()
        return self.state

    # ------------------------------------------------------------------ checkpoints and rollback
    def extra_state(self) -> dict[str, Any]:
        """Subclass state saved with each checkpoint next to TrainState (e.g. early stopping)."""
        return {}

    def load_extra_state(self, saved: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved (called on resume and rollback)."""

    def adopt_checkpoint(self, tag: str, saved: dict[str, Any]) -> None:
        """Bookkeeping once checkpoint ``tag`` is loaded (resume or rollback): retention keeps it, this
        step needs no new save, and subclass state comes back."""
        self.protect, self.last_saved_step = (tag,), saved["step"]
        self.load_extra_state(saved)

    def save(self) -> None:
        if self.last_saved_step == self.state.step:
            return
        t0 = time.monotonic()
        state = {**self.state.as_dict(), **self.extra_state()}
        path = checkpoint.save_checkpoint(
            self.engine, self.cfg, self.dist, self.state.step, state, protect=self.protect
        )
        self.clock.last_save = time.monotonic() - t0
        self.last_saved_step = self.state.step
        if self.dist.is_main:
            console(f"saved checkpoint {path} ({self.clock.last_save:.1f}s)")

    def _skip_recorded_batches(self) -> None:
        """Jump over global batches a spike rollback marked as bad (they are never replayed)."""
        for start, end in self.state.skipped_batches:
            if self.state.consumed_samples == start:
                self.state.consumed_samples = end
                self._open_batches()
                if self.dist.is_main:
                    console(f"skipping samples [{start}, {end}) (marked by a loss-spike rollback)")

    def roll_back(self, rollback: Rollback) -> None:
        """Reload the newest valid checkpoint and mark the spiking batch so it is never replayed."""
        cfg, old = self.cfg, self.state
        if old.rollbacks >= cfg.train.max_rollbacks:
            raise TrainingError(
                f"loss spike at step {rollback.step} after {old.rollbacks} rollbacks (train.max_rollbacks); "
                "stopping: inspect the data and the learning rate"
            )
        tag = checkpoint.choose_resume_tag(cfg, self.dist)
        if tag is None:
            if self.dist.is_main:
                console(f"loss spike at step {rollback.step}: no checkpoint to roll back to, continuing")
            return
        bad = [rollback.batch_start, rollback.batch_start + cfg.train.global_batch_size]
        saved = checkpoint.resume(self.engine, cfg, self.dist, tag)
        self.state = TrainState.from_saved(saved)
        self.adopt_checkpoint(tag, saved)
        self.state.skipped_batches = sorted(map(list, {tuple(r) for r in [*old.skipped_batches, bad]}))
        self.state.rollbacks = old.rollbacks + 1
        self.state.skipped_steps = old.skipped_steps
        self._open_batches()
        if self.dist.is_main:
            console(
                f"rolled back to {tag} after the loss spike at step {rollback.step}; samples "
                f"[{bad[0]}, {bad[1]}) will be skipped (rollback {self.state.rollbacks}/{cfg.train.max_rollbacks})"
            )
        self.metrics.write(
            {"step": rollback.step, "rollback_to": self.state.step, "skip_start": bad[0]}, "spike"
        )

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over every trained token of up to ``train.eval_steps`` validation global batches
        (token-weighted like training); None without validation data or trained tokens."""
        if self.make_valid_batches is None:
            return None
        batches = self.make_valid_batches()
        self.engine.eval()
        loss_sum, tokens = 0.0, 0.0
        try:
            for _ in range(self.cfg.train.eval_steps):
                gb = self.next_global_batch(batches)
                n = float(gb.tokens)
                loss_sum += self._forward_global_batch(gb, train=False) * n
                tokens += n
        except StopIteration:
            pass
        finally:
            _close(batches)
            self.engine.train()
        return loss_sum / tokens if tokens else None


# ---------------------------------------------------------------------------- hooks
def nonfinite_hook(trainer: Trainer, r: StepResult) -> None:
    """A non-finite loss or gradient norm: the optimizer already skipped the update (DeepSpeed's ZeRO and
    bf16 optimizers, and bigtrain's guard on the plain one, skip steps with a non-finite norm); apply
    train.nonfinite. fp16 overflows are DeepSpeed's loss scaling at work: logged, not counted."""
    cfg, state = trainer.cfg, trainer.state
    bad_loss = not math.isfinite(r.loss)
    if r.applied and not bad_loss:
        trainer.consecutive_skips = 0
        return
    if cfg.precision == "fp16" and not r.applied and not bad_loss:
        if trainer.dist.is_main:
            console(
                f"step {state.step}: fp16 overflow, update skipped by dynamic loss scaling "
                f"(scale now {fp16_loss_scale(trainer.engine)})"
            )
        return
    what = f"loss {r.loss}" if bad_loss else f"gradient norm {r.grad_norm}"
    if cfg.train.nonfinite == "stop":
        log_hook(trainer, r)  # the bad step is still recorded
        raise TrainingError(
            f"step {state.step}: non-finite {what}; train.nonfinite=stop, so no checkpoint of this step is "
            f"written (last saved step: {trainer.last_saved_step})"
        )
    if r.applied:  # a NaN loss whose gradients were finite (cannot happen through autograd): say so
        raise TrainingError(f"step {state.step}: non-finite {what} but the update was applied; stopping")
    state.skipped_steps += 1
    trainer.consecutive_skips += 1
    if trainer.dist.is_main:
        console(
            f"step {state.step}: non-finite {what}: update skipped, parameters, optimizer state and LR schedule "
            f"unchanged ({trainer.consecutive_skips} in a row, {state.skipped_steps} in all)"
        )
    if trainer.consecutive_skips >= cfg.train.max_consecutive_skips:
        raise TrainingError(
            f"step {state.step}: {trainer.consecutive_skips} non-finite steps in a row "
            f"(train.max_consecutive_skips={cfg.train.max_consecutive_skips}); stopping"
        )


def fp16_loss_scale(engine) -> float | None:
    """DeepSpeed's current dynamic loss scale (fp16 optimizers: ``cur_scale``, ZeRO: ``loss_scale``)."""
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    return None if scale is None else float(scale)


def log_hook(trainer: Trainer, r: StepResult) -> None:
    cfg, state = trainer.cfg, trainer.state
    if state.step % cfg.train.log_interval and state.step != cfg.train.steps and r.applied:
        return
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    tokens_per_sec = tokens / r.seconds
    model_tflops = (
        flops.train_flops_per_token(cfg.model, cfg.derived.padded_vocab_size) * tokens_per_sec / 1e12
    )
    per_gpu_tflops = model_tflops / cfg.derived.world_size
    peak = flops.peak_tflops(trainer.dist.device, cfg.logging.peak_tflops)
    record: dict[str, Any] = {
        "step": state.step,
        "loss": r.loss,
        "lr": r.lr,
        "grad_norm": r.grad_norm,
        "tokens_per_sec": tokens_per_sec,
        "tflops_per_gpu": per_gpu_tflops,  # model FLOPs (MFU); hardware adds recomputation
        "hw_tflops_per_gpu": flops.hardware_flops_per_token(
            cfg.model, cfg.derived.padded_vocab_size, cfg.activation_checkpointing
        )
        * tokens_per_sec
        / 1e12
        / cfg.derived.world_size,
        "consumed_samples": state.consumed_samples,
        "step_seconds": r.seconds,
    }
    if not r.applied:
        record["skipped"] = True
    if cfg.precision == "fp16":
        record["loss_scale"] = fp16_loss_scale(trainer.engine)
    if state.skipped_steps:
        record["skipped_steps"] = state.skipped_steps
    if peak:
        record["mfu"] = per_gpu_tflops / peak
    if trainer.dist.device.type == "cuda":
        record["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # peak resident set size of this process (Linux reports KiB)
        record["mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    trainer.metrics.write(record)
    if trainer.dist.is_main:
        elapsed = time.time() - trainer.started
        eta = elapsed / max(1, state.step) * (cfg.train.steps - state.step)
        gn = "n/a" if r.grad_norm is None else f"{r.grad_norm:.3f}"
        mfu = f" mfu {record['mfu']:.1%}" if peak else ""
        mem = f" mem {record['mem_gib']:.1f}GiB" if "mem_gib" in record else ""
        skipped = " (update skipped)" if not r.applied else ""
        console(
            f"step {state.step}/{cfg.train.steps} loss {r.loss:.4f} lr {r.lr:.3e} grad_norm {gn} "
            f"tok/s {tokens_per_sec:,.0f} tflops/gpu {per_gpu_tflops:.2f}{mfu}{mem} eta {format_duration(eta)}"
            f"{skipped}"
        )


def consensus_hook(trainer: Trainer, r: StepResult) -> None:
    """Decisions every rank must take together, in one all-reduce: stop on an exit signal or the
    wall-clock budget, and act on a loss spike."""
    cfg, state = trainer.cfg, trainer.state
    spike_local = r.applied and trainer.spikes.is_spike(r.loss)
    threshold = trainer.spikes.threshold()
    signalled, out_of_time, spike = agree(
        [trainer.signals.received is not None, trainer.clock.out_of_time(), spike_local], trainer.dist.device
    )
    if spike:
        trainer.metrics.write({"step": state.step, "loss": r.loss, "threshold": threshold}, "spike")
        if trainer.dist.is_main:
            console(
                f"loss spike at step {state.step}: loss {r.loss:.4f} is above the running mean + "
                f"{cfg.train.spike_sigma:g} std ({threshold:.4f})"
            )
        if cfg.train.spike_rollback:
            raise Rollback(state.step, state.consumed_samples - cfg.train.global_batch_size)
    if signalled:
        trainer.stop_reason = f"signal {trainer.signals.received or 'received by another rank'}"
    elif out_of_time:
        trainer.stop_reason = f"train.max_minutes={cfg.train.max_minutes:g} nearly used"
    if trainer.stop_reason and trainer.dist.is_main:
        console(f"stopping after step {state.step}: {trainer.stop_reason}")


def eval_hook(trainer: Trainer, r: StepResult) -> None:
    cfg, step = trainer.cfg, trainer.state.step
    due = (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or step == cfg.train.steps
    if not due or trainer.make_valid_batches is None or trainer.stop_reason:
        return
    val_loss = trainer.evaluate()
    if val_loss is None:
        return
    trainer.metrics.write(
        {"step": step, "val_loss": val_loss, "val_ppl": float(torch.tensor(val_loss).exp())}, "valid"
    )
    if trainer.dist.is_main:
        console(
            f"validation step {step}: val_loss {val_loss:.4f} ppl {float(torch.tensor(val_loss).exp()):.2f}"
        )


def checkpoint_hook(trainer: Trainer, r: StepResult) -> None:
    cfg, step = trainer.cfg, trainer.state.step
    if not cfg.checkpoint.save:
        return
    due = (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == cfg.train.steps
    if due or trainer.stop_reason:
        trainer.save()


def fault_injection_hook(trainer: Trainer, r: StepResult) -> None:
    """debug.crash_at_step / debug.sleep_at_step (see :mod:`bigtrain.reliability`)."""
    inject_process_faults(trainer.cfg, trainer.dist.rank, trainer.state.step)
