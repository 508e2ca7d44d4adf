"""Routing statistics of a mixture-of-experts model (``model.moe``) for the step log.

What one step's record gets (:meth:`RoutingStats.record`), the same on every rank:

- ``moe_aux_loss``: the load-balancing loss as HF reports it per block (``E * sum_e f_e P_e``, f_e the
  fraction of the block's top-k slots routed to expert e, P_e its mean router probability), averaged over
  the MoE blocks and the step's micro-batches (only when ``model.moe.aux_loss_coeff`` > 0: megatron does
  not compute it otherwise). megatron's tracker holds it divided by top-k.
- ``moe_z_loss``: the router z-loss ``mean(logsumexp(logits)^2)``, averaged alike (``z_loss_coeff`` > 0).
- ``moe_expert_fraction``: per MoE block (in block order), each expert's share of the top-k slots the
  experts received in this step ([blocks][experts], each row summing to 1).
- ``moe_load_ratio``: the most loaded expert's slots over the least loaded one's, in the worst block
  (1: balanced; null when an expert of some block received no token this step).
- ``moe_dropped_fraction``: slots dropped by the capacity factor over all top-k slots (only with
  ``model.moe.capacity_factor``).

Counts come from forward hooks on each MoE layer's ``router`` (megatron's ``TopKRouter``, which returns
``(probs, routing_map)``, routing_map [tokens, experts] bool after capacity dropping). Only a training
forward inside the model's own forward counts: evaluation runs in eval mode, and the recomputation of a
checkpointed block (``activation_checkpointing: full``) runs in backward, outside it. megatron's aux-loss
tracker records every training forward, recomputations included; they repeat the first forward's value,
so dividing its sums by the number of router calls gives the per-micro-batch mean either way.

Reduction: one all-reduce (sum) over the world of [aux, z, calls, slots, counts] per block: data-parallel
ranks (expert-parallel ones among them) route different samples, sequence-parallel tensor ranks
(required with TP under MoE) different positions, pipeline stages hold different blocks (zeros elsewhere),
so the sum is the global count. megatron's own reduction sums the load-balancing loss over the tensor
group and averages it over data ranks, the z-loss (computed on each rank's own tokens) is averaged.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bigtrain.config import ModelConfig


class RoutingStats:
    """Per-step routing counts of the MoE layers of ``model`` (the module the engine runs: a LlamaModel
    or DeepSpeed's PipelineModule); hooks are registered at construction and stay for the run.
    ``tensor``: the tensor-parallel size (to undo the sum of z-loss values over tensor ranks)."""

    def __init__(self, m: ModelConfig, model: torch.nn.Module, tensor: int = 1):
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        from bigtrain.models.moe import MoE

        self.m, self.tensor = m, tensor
        # megatron's tracker is a process global sized by the first model that records into it: a new
        # run in the same process (tests) starts it afresh at this model's number of blocks
        get_moe_layer_wise_logging_tracker().clear()
        self.blocks = [i for i in range(m.num_layers) if m.moe.is_moe_block(i)]
        self.layers = {mod.layer_number - 1: mod for mod in model.modules() if isinstance(mod, MoE)}
        e = m.moe.num_experts
        device = next(model.parameters()).device
        # per block (all num_layers rows; other stages' and dense blocks' rows stay 0):
        self.counts = torch.zeros(m.num_layers, e, dtype=torch.float64, device=device)  # slots per expert
        self.tokens = torch.zeros(m.num_layers, dtype=torch.float64, device=device)  # routed tokens
        self.calls = [0] * m.num_layers  # training router forwards, recomputations included
        self.in_forward = False
        model.register_forward_pre_hook(lambda *_: self._enter(True))
        model.register_forward_hook(lambda *_: self._enter(False))
        for block, layer in self.layers.items():
            layer.router.register_forward_hook(self._counter(block))

    def _enter(self, inside: bool) -> None:
        self.in_forward = inside

    def _counter(self, block: int) -> Any:
        def hook(router: torch.nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            if not (router.training and torch.is_grad_enabled()):
                return  # evaluation, generation: not a training forward
            self.calls[block] += 1
            if self.in_forward:  # not a recomputation in backward
                routing_map = output[1].detach()  # [tokens, experts] bool
                self.counts[block] += routing_map.sum(0, dtype=torch.float64)
                self.tokens[block] += routing_map.shape[0]

        return hook

    def reset(self) -> None:
        """Forget this step's counts and clear megatron's aux-loss tracker (called after every step)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self.counts.zero_()
        self.tokens.zero_()
        self.calls = [0] * self.m.num_layers
        clear_aux_losses_tracker()

    def record(self) -> dict[str, Any]:
        """This step's metrics (see the module docstring), reduced over every rank (collective: call on
        all ranks at the same step)."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        m, n = self.m, self.m.num_layers
        tracker = get_moe_layer_wise_logging_tracker()
        device = self.counts.device

        def tracked(name: str) -> torch.Tensor:
            values = tracker.get(name, {}).get("values")
            if values is None:
                return torch.zeros(n, dtype=torch.float64, device=device)
            return values.detach().to(device=device, dtype=torch.float64)[:n]

        calls = torch.tensor(self.calls, dtype=torch.float64, device=device)
        # [5n + n E]: aux sums, z sums, router calls, routed tokens, slots per expert
        flat = torch.cat(
            [tracked("load_balancing_loss"), tracked("z_loss"), calls, self.tokens, self.counts.flatten()]
        )
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flat)
        aux, z, calls, tokens, counts = flat.split([n, n, n, n, n * m.moe.num_experts])
        counts = counts.view(n, -1)[self.blocks]  # [moe blocks, experts]
        calls = calls[self.blocks].clamp(min=1)
        out: dict[str, Any] = {}
        if m.moe.aux_loss_coeff > 0:  # the tracker holds HF's value / top_k, summed over tensor ranks
            out["moe_aux_loss"] = float((aux[self.blocks] * self.tensor / calls).mean()) * m.moe.top_k
        if m.moe.z_loss_coeff > 0:
            out["moe_z_loss"] = float((z[self.blocks] / calls).mean())
        routed = counts.sum(1, keepdim=True)  # [moe blocks, 1]
        out["moe_expert_fraction"] = [
            [round(f, 6) for f in row] for row in (counts / routed.clamp(min=1)).tolist()
        ]
        low = counts.min(1).values
        ratio = float((counts.max(1).values / low).max()) if bool((low > 0).all()) else math.inf
        out["moe_load_ratio"] = ratio if math.isfinite(ratio) else None
        if m.moe.capacity_factor is not None:
            slots = tokens[self.blocks].sum() * m.moe.top_k
            out["moe_dropped_fraction"] = float(1 - counts.sum() / slots.clamp(min=1))
        return out
