"""How one global batch goes through the engine: the only place, besides the model build, that knows
whether the model is pipelined. ``make_runner`` picks one of two runners with one interface:

* :class:`MicroBatchRunner`: DeepSpeed's engine (or a plain module, for evaluation) called on each
  micro-batch, ``backward`` and ``step`` after each (DeepSpeed steps the optimizer at the accumulation
  boundary);
* :class:`PipelineRunner`: DeepSpeed's ``PipelineEngine.train_batch``/``eval_batch``, the micro-batches
  fed through a data iterator (the first and last stage read them).

What a task feeds the model is a :class:`BatchAdapter` (pretraining: tokens; fine-tuning: tokens,
positions and document ids), so the runners know nothing of tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bigtrain import compat
from bigtrain.config import Config
from bigtrain.models.moe import set_aux_loss_scale

if TYPE_CHECKING:
    from bigtrain.distributed import Dist

from bigtrain.batch import Batch, BatchAdapter


@dataclass
class GlobalBatch:
    """This rank's share of one global batch and the loss normalizer its micro-batches use."""

    micro_batches: list[Batch]  # grad_accum_steps micro-batches, still on the host
    tokens: torch.Tensor  # trained tokens (classification: example weight) of the whole global batch
    normalizer: (
        torch.Tensor | None
    )  # tokens / (micro-batches x DP ranks), fp32, on the device; None: own mean


# the entries [b, s] that context parallelism splits along the sequence; the rest stay whole (doc_ids:
# the attention core sees whole sequences, see llama.Attention)
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "positions")


def to_device(batch: Batch, device: torch.device) -> Batch:
    """This rank's part of a micro-batch, on ``device``: under context parallelism (``parallel.context``
    = c > 1), its chunk [b, s/c] of each of ``SEQUENCE_KEYS`` (rank r: positions [r*s/c, (r+1)*s/c)).
    The loss normalizer still counts the whole samples' tokens (each context rank's loss is its chunk's
    share; DeepSpeed sums gradients over context ranks, see ``distributed.MegatronMPU``)."""
    from megatron.core import parallel_state

    if (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_context_parallel_world_size() > 1
    ):
        rank, size = (
            parallel_state.get_context_parallel_rank(),
            parallel_state.get_context_parallel_world_size(),
        )
        batch = {k: v.chunk(size, dim=1)[rank] if k in SEQUENCE_KEYS else v for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def data_parallel_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over every rank holding a different part of the data: the data-parallel ranks
    and, under context parallelism, the context ranks of each (megatron's data x context group)."""
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        torch.distributed.all_reduce(value, group=group)
    return value


def _dp_mean(value: torch.Tensor) -> float:
    """A 0-dim device tensor's mean over data-parallel ranks, summed over context ranks (each holds
    its chunk's share of the loss), read on the host (one sync)."""
    from megatron.core import parallel_state

    return float(data_parallel_sum(value) / parallel_state.get_data_parallel_world_size())


class MicroBatchRunner:
    """One forward per micro-batch; the module returns the micro-batch's loss (its token-loss sum over
    the global batch's normalizer, see ``lm_loss``)."""

    needs_engine = False  # a plain module (evaluation) runs too

    def __init__(self, engine: Any, adapter: BatchAdapter, device: torch.device):
        self.engine, self.adapter, self.device = engine, adapter, device

    def run(self, gb: GlobalBatch, train: bool, multiplier: float = 1.0) -> float:
        """Forward (and with ``train``, backward and step) every micro-batch of ``gb``; returns the mean
        over the global batch's trained tokens, the same on every rank. ``multiplier`` scales the
        trained loss (debug injections: NaN, spikes)."""
        total = torch.zeros((), device=self.device)
        if train:
            scale_aux_losses(self.engine)
        for b in gb.micro_batches:
            b = to_device(b, self.device)
            micro_loss = self.engine(*self.adapter.model_inputs(b), *self.adapter.targets(b), gb.normalizer)
            if train:
                if multiplier != 1.0:
                    micro_loss = micro_loss * multiplier
                self.engine.backward(micro_loss)
                self.engine.step()
            total += micro_loss.detach().float()
        return _dp_mean(total / len(gb.micro_batches))

    def outputs(self, b: Batch) -> torch.Tensor:
        """The model's outputs for one micro-batch already on the device (see ``LlamaModel.outputs``)."""
        module = getattr(self.engine, "module", self.engine)  # DeepSpeed's engine, or the plain model
        return module.outputs(*self.adapter.model_inputs(b))

    def from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the last pipeline stage computed it: every rank of a one-stage model has it."""
        return t


class PipelineRunner:
    """DeepSpeed's pipeline engine; the normalizer rides with the labels to the last stage, whose loss
    function (``engine.module.loss_fn``) is wrapped once to apply debug multipliers."""

    needs_engine = True  # the stages run only inside DeepSpeed's PipelineEngine

    def __init__(self, engine: Any, adapter: BatchAdapter, device: torch.device):
        self.engine, self.adapter, self.device = engine, adapter, device
        self.multiplier = 1.0
        compat.scale_pipeline_loss(engine.module, lambda: self.multiplier)

    def _item(self, b: Batch, normalizer: torch.Tensor | None = None) -> tuple:
        """(inputs, labels) as the pipeline engine wants one micro-batch: a lone input is not a tuple."""
        inputs = self.adapter.model_inputs(b)
        labels: tuple[torch.Tensor, ...] = self.adapter.targets(b)
        if normalizer is not None:  # the pipeline engine sends tensors only
            labels = (*labels, normalizer)
        return inputs[0] if len(inputs) == 1 else inputs, labels

    def _items(self, gb: GlobalBatch) -> Iterator[tuple]:
        for b in gb.micro_batches:
            yield self._item(to_device(b, self.device), gb.normalizer)

    def run(self, gb: GlobalBatch, train: bool, multiplier: float = 1.0) -> float:
        """As :meth:`MicroBatchRunner.run`; DeepSpeed averages the loss over data-parallel ranks."""
        if not train:
            n = len(gb.micro_batches)
            return float(self.engine.eval_batch(data_iter=self._items(gb), num_micro_batches=n))
        self.multiplier = multiplier
        scale_aux_losses(self.engine)
        try:
            return float(self.engine.train_batch(data_iter=self._items(gb)))
        finally:
            self.multiplier = 1.0

    def outputs(self, b: Batch) -> torch.Tensor | None:
        """The last stage's outputs for one micro-batch (None on other stages). The engine's loss
        function leaves the outputs it returns intact in evaluation (see ``LMLoss``)."""
        _, out = self.engine.eval_batch(
            data_iter=iter([self._item(b)]), return_logits=True, bcast_loss=False, num_micro_batches=1
        )
        return out if self.engine.is_last_stage() else None

    def from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """Share ``t`` (zeros on every stage but the last) over the pipeline group, in place."""
        from megatron.core import parallel_state

        torch.distributed.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
        return t


StepRunner = MicroBatchRunner | PipelineRunner


def scale_aux_losses(engine: Any) -> None:
    """Give the MoE aux losses' gradients (``bigtrain.models.moe``) the factor DeepSpeed's backward gives
    the loss: 1/gradient-accumulation steps, times the fp16 loss scale."""
    from bigtrain.hooks import fp16_loss_scale

    set_aux_loss_scale((fp16_loss_scale(engine) or 1.0) / engine.gradient_accumulation_steps())


def _runner_class(cfg: Config) -> type[StepRunner]:
    """The one test of the engine kind: DeepSpeed's ``PipelineEngine`` when ``parallel.pipeline > 1``."""
    return PipelineRunner if cfg.parallel.pipeline > 1 else MicroBatchRunner


def make_runner(cfg: Config, engine: Any, adapter: BatchAdapter, device: torch.device) -> StepRunner:
    """The runner for ``engine`` (what ``bigtrain.engine.initialize_engine`` returned for ``cfg``)."""
    return _runner_class(cfg)(engine, adapter, device)


def make_eval_runner(cfg: Config, model: torch.nn.Module, dist: Dist, adapter: BatchAdapter) -> StepRunner:
    """A runner for evaluation only, in eval mode: a pipelined model needs DeepSpeed's engine to run at
    all, a one-stage model runs as it is (no optimizer state allocated)."""
    cls = _runner_class(cfg)
    if cls.needs_engine:
        from bigtrain.engine import initialize_engine

        engine = initialize_engine(cfg, model, dist)
    else:
        engine = model.to(dist.device)
    engine.eval()
    return cls(engine, adapter, dist.device)
