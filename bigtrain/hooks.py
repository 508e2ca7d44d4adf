"""Side concerns of the training loop, one object each, called in order after every optimizer step.

A hook owns its state: ``state_dict()`` is saved in every checkpoint's ``bigtrain.json`` (and DeepSpeed's
client state) under the hook's ``state_key``, and ``load_state_dict`` gets it back on resume and on a
spike rollback. A hook ends the run through ``trainer.request_stop``; "is it due" is
``trainer.due(interval)`` (every ``interval`` steps and at the last step). Adding a side concern is
adding a :class:`Hook` subclass to the trainer's list.
"""

from __future__ import annotations

import math
import resource
import time
from typing import TYPE_CHECKING, Any

import torch

from bigtrain import flops
from bigtrain.metrics import console, format_duration
from bigtrain.moe_stats import RoutingStats
from bigtrain.reliability import (
    SpikeDetector,
    TrainingError,
    WallClock,
    agree,
    exit_signals,
    inject_process_faults,
)

if TYPE_CHECKING:
    from bigtrain.config import Config
    from bigtrain.trainer import StepResult, Trainer


class Hook:
    """Called after each step with its :class:`~bigtrain.trainer.StepResult`. ``state_key``: where its
    state lives in a checkpoint (None: nothing to save)."""

    state_key: str | None = None

    def attach(self, trainer: Trainer) -> None:
        """Called once by the trainer before the first step (a hook that watches the model registers
        its module hooks here)."""

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        raise NotImplementedError

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass


class Rollback(Exception):
    """Raised by a hook to reload the last checkpoint and skip the global batch that started at
    ``batch_start``."""

    def __init__(self, step: int, batch_start: int):
        super().__init__(f"rollback requested at step {step}")
        self.step, self.batch_start = step, batch_start


# ---------------------------------------------------------------------------- non-finite steps
class NonFinitePolicy(Hook):
    """A non-finite loss or gradient norm: the optimizer already skipped the update (DeepSpeed's ZeRO and
    bf16 optimizers, and bigtrain's guard on the plain one, skip steps with a non-finite norm); apply
    train.nonfinite. fp16 overflows are DeepSpeed's loss scaling at work: logged, not counted."""

    state_key = "nonfinite"

    def __init__(self) -> None:
        self.consecutive_skips = 0

    def state_dict(self) -> dict[str, int]:
        return {"consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive_skips = state["consecutive_skips"]

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        cfg, state = trainer.cfg, trainer.state
        bad_loss = not math.isfinite(r.loss)
        if r.applied and not bad_loss:
            self.consecutive_skips = 0
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
            log_step(trainer, r)  # the bad step is still recorded
            raise TrainingError(
                f"step {state.step}: non-finite {what}; train.nonfinite=stop, so no checkpoint of this step "
                f"is written (last saved step: {trainer.last_saved_step})"
            )
        if r.applied:  # a NaN loss whose gradients were finite (cannot happen through autograd): say so
            raise TrainingError(f"step {state.step}: non-finite {what} but the update was applied; stopping")
        state.skipped_steps += 1
        self.consecutive_skips += 1
        if trainer.dist.is_main:
            console(
                f"step {state.step}: non-finite {what}: update skipped, parameters, optimizer state and LR "
                f"schedule unchanged ({self.consecutive_skips} in a row, {state.skipped_steps} in all)"
            )
        if self.consecutive_skips >= cfg.train.max_consecutive_skips:
            raise TrainingError(
                f"step {state.step}: {self.consecutive_skips} non-finite steps in a row "
                f"(train.max_consecutive_skips={cfg.train.max_consecutive_skips}); stopping"
            )


def fp16_loss_scale(engine: Any) -> float | None:
    """DeepSpeed's current dynamic loss scale (fp16 optimizers: ``cur_scale``, ZeRO: ``loss_scale``)."""
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    return None if scale is None else float(scale)


# ---------------------------------------------------------------------------- logging
def logged(trainer: Trainer, r: StepResult) -> bool:
    """Whether this step goes to metrics.jsonl: every ``train.log_interval`` steps, the last step and
    every skipped update (the same on every rank)."""
    return trainer.due(trainer.cfg.train.log_interval) or not r.applied


class MoERouting(Hook):
    """Mixture-of-experts routing metrics (:mod:`bigtrain.moe_stats`) added to the step's record
    (``r.extra``) on logged steps; runs before :class:`StepLog`. Counts cover one step: they and
    megatron's aux-loss tracker are cleared after every step."""

    def __init__(self) -> None:
        self.stats: RoutingStats | None = None

    def attach(self, trainer: Trainer) -> None:
        module = getattr(trainer.engine, "module", trainer.engine)
        self.stats = RoutingStats(trainer.cfg.model, module, trainer.cfg.parallel.tensor)
        self.stats.reset()  # nothing recorded before the first step counts

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        if self.stats is None:
            raise RuntimeError("MoERouting: the trainer did not attach the hook to its model")
        if logged(trainer, r):
            r.extra.update(self.stats.record())
        self.stats.reset()


class StepLog(Hook):
    """metrics.jsonl and the console line, every ``train.log_interval`` steps, at the last step and at
    every skipped update."""

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        if logged(trainer, r):
            log_step(trainer, r)


def log_step(trainer: Trainer, r: StepResult) -> None:
    cfg, state = trainer.cfg, trainer.state
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    tokens_per_sec = tokens / r.seconds
    vocab = flops.output_vocab(cfg.model, cfg.derived.padded_vocab_size, cfg.parallel.tensor)
    model_tflops = flops.train_flops_per_token(cfg.model, vocab) * tokens_per_sec / 1e12
    per_gpu_tflops = model_tflops / cfg.derived.world_size
    peak = flops.peak_tflops(trainer.dist.device, cfg.logging.peak_tflops)
    record: dict[str, Any] = {
        "step": state.step,
        "loss": r.loss,
        "lr": r.lr,
        "grad_norm": r.grad_norm,
        "tokens_per_sec": tokens_per_sec,
        "tflops_per_gpu": per_gpu_tflops,  # model FLOPs (MFU); hardware adds recomputation
        "hw_tflops_per_gpu": flops.hardware_flops_per_token(cfg.model, vocab, cfg.activation_checkpointing)
        * tokens_per_sec
        / 1e12
        / cfg.derived.world_size,
        "consumed_samples": state.consumed_samples,
        "step_seconds": r.seconds,
    }
    record.update(r.extra)  # other hooks' values for this step (MoE routing)
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


# ---------------------------------------------------------------------------- decisions all ranks share
class Vote(Hook):
    """A decision every rank must take together: ``vote`` is this rank's flag, ``act`` runs on every
    rank when any rank voted yes. Votes are gathered by :class:`Consensus` in one all-reduce."""

    def vote(self, trainer: Trainer, r: StepResult) -> bool:
        raise NotImplementedError

    def act(self, trainer: Trainer, r: StepResult) -> None:
        raise NotImplementedError


class SpikeGuard(Vote):
    """A loss spike (:class:`SpikeDetector`): logged, and with ``train.spike_rollback`` rolled back.
    Its loss history is saved with checkpoints, so a resumed run judges as the uninterrupted one."""

    state_key = "spike_history"

    def __init__(self, sigma: float, window: int, min_history: int):
        self.spikes = SpikeDetector(sigma, window, min_history)
        self.threshold: float | None = None

    def state_dict(self) -> list[float]:
        return list(self.spikes.history)

    def load_state_dict(self, state: list[float]) -> None:
        self.spikes.history.clear()
        self.spikes.history.extend(state)

    def vote(self, trainer: Trainer, r: StepResult) -> bool:
        spike = r.applied and self.spikes.is_spike(r.loss)
        self.threshold = self.spikes.threshold()  # a spike is not in the history: the limit it broke
        return spike

    def act(self, trainer: Trainer, r: StepResult) -> None:
        cfg, state = trainer.cfg, trainer.state
        trainer.metrics.write({"step": state.step, "loss": r.loss, "threshold": self.threshold}, "spike")
        if trainer.dist.is_main:
            console(
                f"loss spike at step {state.step}: loss {r.loss:.4f} is above the running mean + "
                f"{cfg.train.spike_sigma:g} std ({self.threshold:.4f})"
            )
        if cfg.train.spike_rollback:
            raise Rollback(state.step, state.consumed_samples - cfg.train.global_batch_size)


class ExitSignalStop(Vote):
    """SIGTERM/SIGUSR1 (train.exit_signal_save): save at the step's end and exit 0."""

    def __init__(self, enabled: bool):
        self.signals = exit_signals(enabled)  # the process's handlers, installed once

    def vote(self, trainer: Trainer, r: StepResult) -> bool:
        return self.signals.received is not None

    def act(self, trainer: Trainer, r: StepResult) -> None:
        trainer.request_stop(f"signal {self.signals.received or 'received by another rank'}")


class WallClockStop(Vote):
    """train.max_minutes: stop while one more step and a save still fit (per process: not saved)."""

    def __init__(self, max_minutes: float):
        self.max_minutes = max_minutes
        self.clock = WallClock(max_minutes)

    def vote(self, trainer: Trainer, r: StepResult) -> bool:
        self.clock.observe_step(r.seconds)
        self.clock.last_save = trainer.last_save_seconds
        return self.clock.out_of_time()

    def act(self, trainer: Trainer, r: StepResult) -> None:
        if trainer.stop_reason is None:  # a signal's reason comes first
            trainer.request_stop(f"train.max_minutes={self.max_minutes:g} nearly used")


class Consensus(Hook):
    """Every :class:`Vote` in one all-reduce, then each agreed one acts, in order."""

    def __init__(self, votes: list[Vote]):
        self.members = votes

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        flags = agree([v.vote(trainer, r) for v in self.members], trainer.dist.device)
        for vote, flag in zip(self.members, flags):
            if flag:
                vote.act(trainer, r)
        if trainer.stop_reason and trainer.dist.is_main:
            console(f"stopping after step {trainer.state.step}: {trainer.stop_reason}")


# ---------------------------------------------------------------------------- validation, checkpoints
class Validation(Hook):
    """Token-weighted validation loss (``Trainer.evaluate``) every ``train.eval_interval`` steps and at the
    last; skipped when the run is being interrupted (its time is for the save)."""

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        step = trainer.state.step
        if not trainer.due(trainer.cfg.train.eval_interval) or trainer.stop_reason:
            return
        val_loss = trainer.evaluate()
        if val_loss is None:
            return
        if trainer.cfg.model.family == "bert":  # MLM + NSP: no perplexity (bigtrain.evaluate splits them)
            trainer.metrics.write({"step": step, "val_loss": val_loss}, "valid")
            if trainer.dist.is_main:
                console(f"validation step {step}: val_loss {val_loss:.4f} (MLM + NSP)")
            return
        ppl = float(torch.tensor(val_loss).exp())
        trainer.metrics.write({"step": step, "val_loss": val_loss, "val_ppl": ppl}, "valid")
        if trainer.dist.is_main:
            console(f"validation step {step}: val_loss {val_loss:.4f} ppl {ppl:.2f}")


class Checkpointing(Hook):
    """A checkpoint every ``checkpoint.interval`` steps, at the last step and when the run stops."""

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        cfg = trainer.cfg
        if cfg.checkpoint.save and (trainer.due(cfg.checkpoint.interval) or trainer.stop_reason):
            trainer.save()


class FaultInjection(Hook):
    """debug.crash_at_step / debug.sleep_at_step (see :mod:`bigtrain.reliability`)."""

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        inject_process_faults(trainer.cfg, trainer.dist.rank, trainer.state.step)


def default_hooks(cfg: Config) -> list[Hook]:
    """Pretraining's hooks, in the order they run."""
    t = cfg.train
    moe: list[Hook] = [MoERouting()] if cfg.model.moe.num_experts else []
    return [
        NonFinitePolicy(),
        *moe,
        StepLog(),
        Consensus(
            [
                SpikeGuard(t.spike_sigma, t.spike_window, t.spike_min_history),
                ExitSignalStop(t.exit_signal_save),
                WallClockStop(t.max_minutes),
            ]
        ),
        Validation(),
        Checkpointing(),
        FaultInjection(),
    ]
