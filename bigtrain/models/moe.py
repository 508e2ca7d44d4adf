"""Mixture of experts: the MLP of a MoE block (``model.moe``), as in Mixtral (Jiang et al. 2024) and
Qwen2-MoE: a top-k router over ``num_experts`` SwiGLU experts, an optional always-on shared expert.

The routing and the token movement are megatron-core's (``MoELayer`` with its ``TopKRouter`` and
``MoEAlltoAllTokenDispatcher``): softmax-then-top-k in fp32, optional renormalization, the Switch/GShard
load-balancing loss and the ST-MoE z-loss (both added to the gradients by megatron's
``MoEAuxLossAutoScaler``, so the returned loss stays the language-model loss and pipelines need no
extra tensors), dropless by default or a capacity factor, and all-to-all dispatch over the expert-parallel
group (``parallel.expert``). The experts themselves are bigtrain's :class:`GroupedExperts`: one stacked
parameter per projection ([experts, ...], as HF's ``MixtralExperts``), so the layout table names each
expert weight once whatever the expert-parallel size (megatron's CPU-capable ``SequentialMLP`` names a
module per *local* expert; its stacked ``GroupedMLP`` needs the CUDA-only grouped_gemm package).

Why megatron-core's layer and not ``deepspeed.moe`` (measured and read, 2026-12): DeepSpeed's gate always
renormalizes top-2 (Qwen2-MoE does not), samples the second expert with Gumbel noise by default, computes
the aux loss from the first choice only, has no z-loss, and dispatches through dense
[tokens, experts, capacity] einsums padded to the largest expert; megatron's router reproduces HF's
Mixtral and Qwen2-MoE blocks (``tests/models/test_moe.py``) and its dispatcher sends only routed tokens.
DeepSpeed still reduces and shards the expert weights over their expert-data-parallel group
(:func:`bigtrain.compat.deepspeed_expert_groups`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.utils import get_pg_size
from torch import nn

from bigtrain import compat
from bigtrain.config import ModelConfig
from bigtrain.models.layers import Linear, TensorParallel


class _OneRank:
    """A process group of one, for a process without torch.distributed (a unit test, a conversion
    tool): megatron's MoE layer asks every group its size and rank; at size 1 it sends nothing."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def process_groups(tp: TensorParallel) -> ProcessGroupCollection:
    """megatron-core's groups for a MoE layer at ``tp``'s place: tensor (``tp.group``), expert
    (``tp.expert``: expert-parallel, expert-tensor = tensor, expert-data) and the combined groups its
    router reduces token counts over. Without torch.distributed: groups of one."""
    if tp.expert.groups is not None:
        return tp.expert.groups
    pgs = ProcessGroupCollection()
    one = _OneRank()
    for name in ("tp", "cp", "ep", "expt_tp", "expt_dp", "tp_ep", "tp_cp", "tp_dp_cp", "dp", "pp"):
        setattr(pgs, name, one)
    return pgs


def transformer_config(m: ModelConfig, tp: TensorParallel) -> TransformerConfig:
    """megatron-core's config of one MoE layer: ``tp.config``'s parallel settings plus ``model.moe``.

    The coefficients apply to the mean over the MoE blocks (HF pools every block's router logits into
    one loss of about one block's size; megatron would sum the blocks), so each block's megatron
    coefficient is divided by their number. megatron's aux loss is HF's per-block value divided by top-k
    (``switch_load_balancing_loss_func`` normalizes the slot counts by top-k): it is given
    ``aux_loss_coeff * top_k / blocks``."""
    e = m.moe
    blocks = m.num_moe_blocks
    parallel = {f.name: getattr(tp.config, f.name) for f in dataclasses.fields(ModelParallelConfig)}
    parallel.update(
        tensor_model_parallel_size=tp.size,
        expert_model_parallel_size=tp.expert.size,
        expert_tensor_parallel_size=tp.size,
        perform_initialization=False,  # bigtrain.models.layout fills every weight
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    return TransformerConfig(
        **parallel,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_size,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        num_moe_experts=e.num_experts,
        moe_ffn_hidden_size=m.expert_ffn_size,
        moe_router_topk=e.top_k,
        # softmax over the top-k logits == softmax over all, top-k, renormalized (Mixtral);
        # pre-softmax: softmax over all, top-k kept as they are (Qwen2-MoE, OLMoE)
        moe_router_pre_softmax=not e.norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=e.aux_loss_coeff * e.top_k / blocks,
        moe_z_loss_coeff=e.z_loss_coeff / blocks or None,
        moe_expert_capacity_factor=e.capacity_factor,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
    )


class GroupedExperts(nn.Module):
    """This rank's experts, stacked: ``gate_up`` [experts/ep, 2*f/tp, h] (each expert's
    ``[gate_r; up_r]``, as the dense MLP's ``gate_up``), ``down`` [experts/ep, h, f/tp].

    Called by megatron's ``MoELayer`` with the tokens its dispatcher sorted by local expert:
    tokens [n, h], ``tokens_per_expert`` [experts/ep] (summing to n), ``probs`` [n] (each token's
    routing weight for that expert) -> (outputs [n, h], None). Under tensor parallelism the outputs are
    partial sums that the dispatcher's combine reduces over the tensor group."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection: Any = None):
        super().__init__()
        tensor = get_pg_size(pg_collection.expt_tp) if pg_collection is not None else 1
        if config.moe_ffn_hidden_size is None or config.moe_ffn_hidden_size % tensor:
            raise ValueError(
                f"model.moe.ffn_hidden_size {config.moe_ffn_hidden_size} is not divisible by parallel.tensor "
                f"{tensor}"
            )
        ffn = config.moe_ffn_hidden_size // tensor
        self.num_local_experts = num_local_experts
        self.gate_up = nn.Parameter(torch.empty(num_local_experts, 2 * ffn, config.hidden_size))
        self.down = nn.Parameter(torch.empty(num_local_experts, config.hidden_size, ffn))

    def forward(
        self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        counts = [int(n) for n in tokens_per_expert.tolist()]
        outputs = []
        for e, chunk in enumerate(tokens.split(counts)):  # [n_e, h] -> [n_e, h]
            gate, up = F.linear(chunk, self.gate_up[e]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, self.down[e]))
        out = torch.cat(outputs)  # [n, h]
        # weighted after the down projection, in fp32 (as HF's MixtralExperts)
        return (out.float() * probs.float().unsqueeze(-1)).to(out.dtype), None


class MoE(MoELayer):
    """The MLP of a MoE block: x [s, b, h] -> [s, b, h] (sequence parallel: this rank's [s/tp, b, h]).

    Parameters (the layout table's names): ``router.weight`` [experts, h] (fp32 logits),
    ``experts.gate_up`` / ``experts.down`` (:class:`GroupedExperts`), and with a shared expert (HF
    Qwen2-MoE's ``shared_expert``: ``dense_mlp``, the block's dense MLP class built at its own width)
    ``shared_expert.gate_up.weight`` [2*fs/tp, h], ``shared_expert.down.weight`` [h, fs/tp] and
    ``shared_expert_gate.weight`` [1, h]. ``block``: 0-based block index (megatron's layer number is
    block + 1, used to label the aux losses it records)."""

    def __init__(self, m: ModelConfig, tp: TensorParallel, block: int, dense_mlp: type[nn.Module]):
        compat.megatron_moe_on(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        experts = MoESubmodules(experts=ModuleSpec(module=GroupedExperts))
        super().__init__(transformer_config(m, tp), experts, block + 1, pg_collection=process_groups(tp))
        self.set_layer_number(block + 1)  # also the router's, which labels the aux losses it records
        # megatron's aux-loss tracker is a process global sized by the first model recording into it: a
        # deeper model built later in the same process (tests, tools) would index past its end
        tracker = get_moe_layer_wise_logging_tracker()
        for name in [n for n, v in tracker.items() if v["values"].numel() < m.num_layers]:
            del tracker[name]
        self.shared_expert: nn.Module | None = None
        self.shared_expert_gate: nn.Module | None = None
        if m.moe.shared_expert_ffn_size:
            shared = dataclasses.replace(m, ffn_hidden_size=m.moe.shared_expert_ffn_size)
            self.shared_expert = dense_mlp(shared, tp)
            if m.moe.shared_expert_gate:
                self.shared_expert_gate = Linear(m.hidden_size, 1)
        # Replicated weights that see a sequence shard under sequence parallelism (megatron marks the
        # router's ``sequence_parallel`` and its own DDP sums it over the tensor group; DeepSpeed does not)
        if tp.group is not None and tp.size > 1 and tp.config.sequence_parallel:
            replicated = [self.router.weight]
            if self.shared_expert_gate is not None:
                replicated.append(self.shared_expert_gate.weight)
            for param in replicated:
                param.register_hook(_sum_over(tp.group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)[0]  # routed experts, weighted: [s, b, h]
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [s, b, h]
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)[0]) * shared
            out = out + shared
        return out


def _sum_over(group: torch.distributed.ProcessGroup) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    return hook


def set_aux_loss_scale(scale: float) -> None:
    """The factor the aux losses' gradients get, matching what the language-model loss's backward is
    scaled by (1/gradient-accumulation steps, times the fp16 loss scale): megatron's
    ``MoEAuxLossAutoScaler`` otherwise gives them 1 on every micro-batch."""
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(float(scale)))
