"""The training loop: a step runner (:mod:`bigtrain.step_runner`) runs each global batch through the
engine, then hooks (:mod:`bigtrain.hooks`: logging, fault policies, validation, checkpoints) are called in
order. The trainer owns the state saved with checkpoints (``TrainState`` and every hook's state), resume,
rollback and the one way to end a run early (:meth:`Trainer.request_stop`)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bigtrain import checkpoint
from bigtrain.batch import BatchAdapter
from bigtrain.config import Config
from bigtrain.distributed import Dist
from bigtrain.hooks import Hook, Rollback, default_hooks
from bigtrain.metrics import MetricsWriter, console
from bigtrain.reliability import TrainingError, loss_multiplier
from bigtrain.step_runner import GlobalBatch, make_runner

__all__ = ["GlobalBatch", "Rollback", "StepResult", "TrainState", "Trainer"]

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


def _close(batches: Iterator[Batch] | None) -> None:
    """Stop a prefetching iterator's thread (plain iterators, and None, have nothing to stop)."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


class Trainer:
    """The loop over global batches. ``adapter``: what a task's micro-batches feed the model;
    ``hooks``: side concerns called after each step (default: pretraining's, :func:`default_hooks`)."""

    def __init__(
        self,
        cfg: Config,
        dist: Dist,
        engine: Any,  # deepspeed's engine (see engine.initialize_engine)
        make_train_batches: Callable[[int], Iterator[Batch]],
        make_valid_batches: Callable[[], Iterator[Batch]] | None = None,
        state: TrainState | None = None,
        adapter: BatchAdapter | None = None,
        hooks: list[Hook] | None = None,
    ):
        self.cfg, self.dist, self.engine = cfg, dist, engine
        self.state = state or TrainState()
        if adapter is None:  # what the family's pretraining feeds its model (bigtrain.registry)
            from bigtrain.registry import train_spec

            adapter = train_spec(cfg).batch
        self.runner = make_runner(cfg, engine, adapter, dist.device)
        self.make_train_batches, self.make_valid_batches = make_train_batches, make_valid_batches
        self.batches: Iterator[Batch] | None = None
        self._open_batches()
        self.metrics = MetricsWriter(
            cfg.train.run_dir, enabled=dist.is_main, tensorboard=cfg.logging.tensorboard
        )
        self.hooks: list[Hook] = default_hooks(cfg) if hooks is None else hooks
        for hook in self._stateful_hooks():
            hook.attach(self)
        self.protect: tuple[str, ...] = ()  # checkpoint tags retention must keep (the one resumed from)
        self.last_saved_step: int | None = None
        self.last_save_seconds = 0.0  # how long the last checkpoint save took (0: none yet)
        self.stop_reason: str | None = None  # the run was interrupted (signal, wall clock): relaunch resumes
        self.completed_early: str | None = None  # the run's work is done before train.steps (early stopping)
        self.started = time.time()

    def _open_batches(self) -> None:
        """(Re)start the training batches at the current consumed-samples position."""
        if self.batches is not None:
            _close(self.batches)
        self.batches = self.make_train_batches(self.state.consumed_samples)

    # ------------------------------------------------------------------ ending the run
    def request_stop(self, reason: str, complete: bool = False) -> None:
        """End the run after this step's hooks; the hooks after the caller still run (the checkpoint hook
        saves this step). ``complete``: the run's work is done (early stopping): this step counts as the
        last one for every "due" rule and the run is finished. Otherwise the run is interrupted (signal,
        wall clock) and a relaunch resumes it; the first reason given is kept."""
        if complete:
            self.completed_early = self.completed_early or reason
        else:
            self.stop_reason = self.stop_reason or reason

    @property
    def at_last_step(self) -> bool:
        return self.state.step == self.cfg.train.steps or self.completed_early is not None

    @property
    def finished(self) -> bool:
        """The run did all it was asked (train.steps, or early stopping) and was not interrupted."""
        done = self.state.step >= self.cfg.train.steps or self.completed_early is not None
        return self.stop_reason is None and done

    def due(self, interval: int) -> bool:
        """The one "is it due" rule: every ``interval`` steps (0: never) and at the last step."""
        step = self.state.step
        return bool(interval and step % interval == 0) or self.at_last_step

    # ------------------------------------------------------------------ what the model is fed
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

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        lr = self.engine.get_lr()[0]  # the rate this step uses; the scheduler moves after the step
        skipped_before = self.engine.skipped_steps
        state = self.state
        multiplier = loss_multiplier(self.cfg, self.dist.rank, state.step + 1, state.consumed_samples)
        if self.batches is None:
            raise RuntimeError("Trainer.train_step: the training batches are not open")
        loss = self.runner.run(self.next_global_batch(self.batches), train=True, multiplier=multiplier)
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
            while self.state.step < cfg.train.steps and self.stop_reason is None and not self.completed_early:
                self._skip_recorded_batches()
                result = self.train_step()
                self.state.step += 1
                self.state.consumed_samples += cfg.train.global_batch_size
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
    def _stateful_hooks(self) -> Iterator[Hook]:
        for hook in self.hooks:
            yield hook
            yield from getattr(hook, "members", ())

    def hook_states(self) -> dict[str, Any]:
        """Every hook's state by its ``state_key``, saved next to TrainState in each checkpoint."""
        return {h.state_key: h.state_dict() for h in self._stateful_hooks() if h.state_key is not None}

    def adopt_checkpoint(self, tag: str, saved: dict[str, Any]) -> None:
        """Bookkeeping once checkpoint ``tag`` is loaded (resume or rollback): retention keeps it, this
        step needs no new save, and the hooks get their saved state back (a key a checkpoint of an
        older bigtrain lacks leaves that hook as it is)."""
        self.protect, self.last_saved_step = (tag,), saved["step"]
        for hook in self._stateful_hooks():
            if hook.state_key is not None and saved.get(hook.state_key) is not None:
                hook.load_state_dict(saved[hook.state_key])

    def save(self) -> None:
        if self.last_saved_step == self.state.step:
            return
        t0 = time.monotonic()
        state = {**self.state.as_dict(), **self.hook_states()}
        path = checkpoint.save_checkpoint(
            self.engine, self.cfg, self.dist, self.state.step, state, protect=self.protect
        )
        self.last_save_seconds = time.monotonic() - t0
        self.last_saved_step = self.state.step
        if self.dist.is_main:
            console(f"saved checkpoint {path} ({self.last_save_seconds:.1f}s)")

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
                loss_sum += self.runner.run(gb, train=False) * n
                tokens += n
        except StopIteration:
            pass
        finally:
            _close(batches)
            self.engine.train()
        return loss_sum / tokens if tokens else None
