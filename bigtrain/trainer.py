"""The training loop. Side concerns (logging, validation, checkpoints) are hooks called after each step;
the step itself is DeepSpeed's (``train_batch`` for pipelines, forward/backward/step otherwise)."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bigtrain import checkpoint, flops
from bigtrain.config import Config
from bigtrain.distributed import Dist
from bigtrain.metrics import MetricsWriter, console, format_duration

Batch = dict[str, torch.Tensor]


@dataclass
class TrainState:
    """Everything the loop advances; saved with checkpoints."""

    step: int = 0
    consumed_samples: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consumed_samples": self.consumed_samples}


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    lr: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


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
        self.make_valid_batches = make_valid_batches
        self.batches = make_train_batches(self.state.consumed_samples)
        self.pipe_items = self._pipeline_items(self.batches) if self.pipeline else None
        self.metrics = MetricsWriter(
            cfg.train.run_dir, enabled=dist.is_main, tensorboard=cfg.logging.tensorboard
        )
        self.hooks: list[Callable[[Trainer, StepResult], None]] = [
            log_hook,
            eval_hook,
            checkpoint_hook,
            crash_hook,
        ]
        self.started = time.time()

    # ------------------------------------------------------------------ what the model is fed
    # Fine-tuning tasks override these two to feed other inputs (positions, document ids, class labels).
    def model_args(self, b: Batch) -> tuple:
        """Positional arguments of the (non-pipeline) model's forward, which returns the loss."""
        return b["tokens"], b["labels"], b["loss_mask"]

    def pipeline_item(self, b: Batch) -> tuple:
        """(inputs, labels) as DeepSpeed's pipeline engine wants them for one micro-batch."""
        return b["tokens"], (b["labels"], b["loss_mask"])

    def _pipeline_items(self, batches: Iterator[Batch]) -> Iterator[tuple]:
        for b in batches:
            yield self.pipeline_item(_to_device(b, self.dist.device))

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        lr = self.engine.get_lr()[0]  # the rate this step uses; the scheduler moves after the step
        if self.pipeline:
            loss = float(self.engine.train_batch(data_iter=self.pipe_items))
        else:
            total = torch.zeros((), device=self.dist.device)
            for _ in range(self.cfg.derived.grad_accum_steps):
                b = _to_device(next(self.batches), self.dist.device)
                micro_loss = self.engine(*self.model_args(b))
                self.engine.backward(micro_loss)
                self.engine.step()
                total += micro_loss.detach().float()
            loss = _dp_mean(total / self.cfg.derived.grad_accum_steps)
        grad_norm = self.engine.get_global_grad_norm()
        return StepResult(
            loss=loss,
            grad_norm=None if grad_norm is None else float(grad_norm),
            lr=lr,
            seconds=time.perf_counter() - t0,
        )

    def train(self) -> TrainState:
        cfg = self.cfg
        while self.state.step < cfg.train.steps:
            result = self.train_step()
            self.state.step += 1
            self.state.consumed_samples += cfg.train.global_batch_size
            for hook in self.hooks:
                hook(self, result)
        _close(self.batches)
        self.metrics.close()
        return self.state

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.make_valid_batches is None:
            return None
        batches = self.make_valid_batches()
        self.engine.eval()
        losses = []
        try:
            for _ in range(self.cfg.train.eval_steps):
                if self.pipeline:
                    loss = self.engine.eval_batch(data_iter=self._pipeline_items(batches))
                    losses.append(_dp_mean(loss.detach().float().clone()))
                else:
                    total = torch.zeros((), device=self.dist.device)
                    for _ in range(self.cfg.derived.grad_accum_steps):
                        b = _to_device(next(batches), self.dist.device)
                        total += self.engine(*self.model_args(b)).float()
                    losses.append(_dp_mean(total / self.cfg.derived.grad_accum_steps))
        except StopIteration:
            pass
        finally:
            _close(batches)
            self.engine.train()
        return sum(losses) / len(losses) if losses else None


# ---------------------------------------------------------------------------- hooks
def log_hook(trainer: Trainer, r: StepResult) -> None:
    cfg, state = trainer.cfg, trainer.state
    if state.step % cfg.train.log_interval and state.step != cfg.train.steps:
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
        "tflops_per_gpu": per_gpu_tflops,
        "consumed_samples": state.consumed_samples,
        "step_seconds": r.seconds,
    }
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
        console(
            f"step {state.step}/{cfg.train.steps} loss {r.loss:.4f} lr {r.lr:.3e} grad_norm {gn} "
            f"tok/s {tokens_per_sec:,.0f} tflops/gpu {per_gpu_tflops:.2f}{mfu}{mem} eta {format_duration(eta)}"
        )


def eval_hook(trainer: Trainer, r: StepResult) -> None:
    cfg, step = trainer.cfg, trainer.state.step
    due = (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or step == cfg.train.steps
    if not due or trainer.make_valid_batches is None:
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
    if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == cfg.train.steps:
        path = checkpoint.save_checkpoint(trainer.engine, cfg, trainer.dist, step, trainer.state.as_dict())
        if trainer.dist.is_main:
            console(f"saved checkpoint {path}")


def crash_hook(trainer: Trainer, r: StepResult) -> None:
    """Fault injection (debug.crash_at_step): die like a killed job, without cleanup."""
    if trainer.cfg.debug.crash_at_step and trainer.state.step == trainer.cfg.debug.crash_at_step:
        console(f"debug.crash_at_step: rank {trainer.dist.rank} exits at step {trainer.state.step}")
        sys.stdout.flush()
        os._exit(13)
