"""LoRA (Hu et al. 2021, as PEFT computes it) on the base model's tensor-parallel projections: a
transform applied after the model is built, never a part of it (as litgpt's lora.py -> model.py).

Each targeted projection keeps its weight and its name and gains ``lora_A``/``lora_B`` (their full
shapes and shardings are the table entries of :func:`lora_specs`, so init, checkpoints, resharding and
export treat them like any other parameter). The adapter's output is added to the projection's:
``scale * B @ A @ dropout(x)``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import nn

from bigtrain.config import Config, ModelConfig
from bigtrain.finetune.params import lora_specs, lora_target
from bigtrain.models import layout
from bigtrain.models.layers import TensorParallel


class LoRADropout(nn.Module):
    """Inverted dropout on a LoRA adapter's input (PEFT's ``lora_dropout``), with the masks of the
    unsharded model: one Bernoulli mask over the full input features, of which a row-parallel adapter
    (whose input is this tensor rank's slice of the features) keeps its own slice, so tensor parallelism
    changes neither the mask nor how many random numbers are drawn; a column-parallel adapter's input is
    replicated and every tensor rank draws the same whole mask.

    The masks come from the global RNG, which every rank seeds alike (``train.seed``) and which only
    dropout draws from during training, so tensor ranks stay in step (and in step with a tensor = 1 run),
    and activation recomputation (torch.utils.checkpoint restores the global RNG) redraws the same masks.
    Data-parallel ranks draw the same masks for their different samples. Eval mode: the identity."""

    def __init__(self, p: float, rank: int = 0, size: int = 1):
        super().__init__()
        self.p, self.rank, self.size = p, rank, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        full = (*x.shape[:-1], x.shape[-1] * self.size)  # [s, b, in]
        keep = torch.empty(full, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        if self.size > 1:
            keep = keep.chunk(self.size, dim=-1)[self.rank]
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, tensor_slice={self.rank}/{self.size}"


class LoRAMixin:
    """Adds ``scale * B @ A @ dropout(x)`` to a projection's output. Column-parallel base (output
    split): A [r, in] replicated, B [out/tp, r] split like the base's rows; the adapter's hidden goes
    through megatron's copy-to-region so its gradient (and so A's and the input's) is all-reduced over
    tensor ranks, like the base's input gradient. Row-parallel base (input split, output all-reduced):
    A [r, in/tp] split like the base's columns, B [out, r] replicated; the rank-r partial product is
    all-reduced (cheap) before B. At tensor size 1 neither needs a collective."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float
    lora_dropout: LoRADropout
    lora_row: bool
    lora_group: torch.distributed.ProcessGroup | None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, bias = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        h = F.linear(self.lora_dropout(x), self.lora_A)  # [s, b, r]
        if self.lora_group is not None:
            region = (
                reduce_from_tensor_model_parallel_region
                if self.lora_row
                else copy_to_tensor_model_parallel_region
            )
            h = region(h, group=self.lora_group)
        return out + F.linear(h, self.lora_B) * self.lora_scale, bias


@functools.cache
def _lora_class(base: type) -> type:
    return type(f"LoRA{base.__name__}", (LoRAMixin, base), {})


def add_lora(layers: dict[int, nn.Module], m: ModelConfig, cfg: Config, tp: TensorParallel) -> None:
    """Give every targeted projection of the blocks in ``layers`` (list index -> module) LoRA parameters
    (filled by initialize_weights via the layout table). The module's class is swapped for a LoRA
    subclass of it rather than wrapped, so the base weight keeps its name and layout key."""
    lora = cfg.finetune.lora
    specs = {s.name: s for s in lora_specs(m, cfg.finetune)}
    for index, layer in layers.items():
        if layout.layer_kind(index, m.num_layers) != layout.BLOCK:
            continue
        for target in lora.targets:
            name, split = lora_target(m, target)
            module = layer.get_submodule(name)
            base: type = type(module)
            module.__class__ = _lora_class(base)
            if not isinstance(module, LoRAMixin):  # just swapped: never
                raise TypeError(f"{name}: the LoRA class swap did not take ({type(module).__name__})")
            for ab in ("lora_A", "lora_B"):
                shape = layout.local_shape(specs[f"{name}.{ab}"], m, 0, tp.size)
                module.register_parameter(ab, nn.Parameter(torch.zeros(shape)))
            module.lora_scale = lora.alpha / lora.rank
            module.lora_row = split == "row"
            module.lora_group = tp.group if tp.size > 1 else None
            # a row-parallel adapter's input is this rank's slice of the features: it keeps that slice
            # of the full mask; a column-parallel adapter's input is whole on every rank
            module.lora_dropout = LoRADropout(
                lora.dropout, *((tp.rank, tp.size) if split == "row" else (0, 1))
            )
