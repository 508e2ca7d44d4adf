"""All parallel wiring in one place: the model's layer list -> DeepSpeed ``PipelineModule`` (pipeline >
1) or the plain model (pipeline = 1, so ZeRO-2/3 and offload apply), megatron-core's parallel config,
and the layout-independent weight initialization from :mod:`bigtrain.models.layout`.

Which layers and parameters a task adds is decided by the caller (:mod:`bigtrain.registry`).
"""

from __future__ import annotations

import torch
from deepspeed.pipe import PipelineModule
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from torch import nn

from bigtrain import compat
from bigtrain.config import Config, torch_dtype
from bigtrain.models import layout
from bigtrain.models.bert import BertModel
from bigtrain.models.layers import ContextParallel, ExpertParallel, TensorParallel
from bigtrain.models.llama import LM_LAYERS, LlamaModel, TaskLayers, skip_norm_grad_reduce
from bigtrain.perf import set_compile


def megatron_config(cfg: Config) -> ModelParallelConfig:
    """megatron-core's view of the layout. Weights are created in fp32 on CPU and filled by our init;
    DeepSpeed casts and moves them."""
    return ModelParallelConfig(
        tensor_model_parallel_size=cfg.parallel.tensor,
        pipeline_model_parallel_size=cfg.parallel.pipeline,
        sequence_parallel=cfg.parallel.sequence_parallel,
        params_dtype=torch.float32,
        pipeline_dtype=torch_dtype(cfg.precision),
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )


def tensor_parallel(cfg: Config) -> TensorParallel:
    """This rank's tensor-parallel place (and its context-parallel one, ``TensorParallel.context``):
    from megatron-core's ``parallel_state`` once it is initialized, else (a unit test, a tool without a
    process group) rank 0 of 1.

    Raises ValueError when ``parallel.tensor`` is not the group's size (or > 1 without a group)."""
    context = ContextParallel()
    if parallel_state.model_parallel_is_initialized():
        size = parallel_state.get_tensor_model_parallel_world_size()
        if size != cfg.parallel.tensor:
            raise ValueError(
                f"parallel.tensor={cfg.parallel.tensor}, but the process group's tensor size is {size}"
            )
        group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()
        if parallel_state.get_context_parallel_world_size() > 1:
            context = ContextParallel(
                parallel_state.get_context_parallel_rank(),
                parallel_state.get_context_parallel_world_size(),
                parallel_state.get_context_parallel_group(),
                rotary_offset=not cfg.debug.skip_rotary_offset,
            )
    elif cfg.parallel.tensor == 1:
        rank, size, group = 0, 1, None
    else:
        raise ValueError(f"parallel.tensor={cfg.parallel.tensor} needs an initialized process group")
    return TensorParallel(rank, size, group, megatron_config(cfg), context, expert_parallel(cfg))


def expert_parallel(cfg: Config) -> ExpertParallel:
    """This rank's expert-parallel place (``parallel.expert``), with megatron-core's process groups for
    its MoE layers once ``parallel_state`` is initialized; rank 0 of 1 without a process group.

    Raises ValueError when ``parallel.expert`` is not the group's size (or > 1 without a group)."""
    if not cfg.model.moe.num_experts:
        return ExpertParallel()
    if not parallel_state.model_parallel_is_initialized():
        if cfg.parallel.expert > 1:
            raise ValueError(f"parallel.expert={cfg.parallel.expert} needs an initialized process group")
        return ExpertParallel()
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    size = parallel_state.get_expert_model_parallel_world_size()
    if size != cfg.parallel.expert:
        raise ValueError(
            f"parallel.expert={cfg.parallel.expert}, but the process group's expert size is {size}"
        )
    return ExpertParallel(parallel_state.get_expert_model_parallel_rank(), size, get_default_pg_collection())


def build(
    cfg: Config,
    model_cls: type[LlamaModel] | type[BertModel] = LlamaModel,
    layers: TaskLayers = LM_LAYERS,
    task: layout.TaskParams = layout.LM,
    topology: object | None = None,  # deepspeed PipeModelDataParallelTopology (see Dist.topology)
) -> nn.Module:
    """This rank's part of the model (weights initialized deterministically, fp32, CPU): ``model_cls``
    (a family's model class) at pipeline = 1, a ``PipelineModule`` over the same layer list
    (``model_cls.layer_specs``) otherwise. ``layers``/``task``: what a task swaps in and which
    parameters it adds (see bigtrain.registry)."""
    set_compile(cfg.train.compile)  # the model's elementwise regions (bigtrain.perf)
    tp = tensor_parallel(cfg)
    args = (cfg.model, tp, cfg.derived.padded_vocab_size, cfg.activation_checkpointing, layers)
    model: nn.Module
    if cfg.parallel.pipeline > 1:
        model = PipelineModule(
            layers=model_cls.layer_specs(*args),
            loss_fn=layers.loss(tp),
            topology=topology,
            partition_method=cfg.parallel.partition_method,
            activation_checkpoint_interval=0,  # blocks recompute themselves (see TransformerBlock)
        )
        compat.count_tied_head_params(model)
    else:
        model = model_cls(*args)
    if cfg.debug.skip_norm_grad_reduce:
        skip_norm_grad_reduce(model)
    return model


# ---------------------------------------------------------------------------- weights by layout key
def local_parameters(
    model: nn.Module, cfg: Config, task: layout.TaskParams = layout.LM
) -> dict[str, tuple[layout.LayerParam, nn.Parameter]]:
    """Layout key ("index.name") -> (table entry, live parameter) for everything this rank holds."""
    layers = layout.local_layers(model, cfg.model)
    return {
        lp.key: (lp, module.get_parameter(lp.spec.name))
        for lp, module in layout.local_layer_params(cfg.model, layers, task)
    }


@torch.no_grad()
def initialize_weights(model: nn.Module, cfg: Config, task: layout.TaskParams = layout.LM) -> None:
    """Fill every local parameter with its shard of the layout-independent full init."""
    tp = tensor_parallel(cfg)
    expert_rank = tp.expert.rank
    if cfg.debug.rotate_expert_ranks:  # a control: tokens reach the next rank's experts
        expert_rank = (expert_rank + 1) % tp.expert.size
    for lp, param in local_parameters(model, cfg, task).values():
        full = layout.init_full(lp.spec, lp.index, cfg.model, cfg.derived.padded_vocab_size, cfg.train.seed)
        value = layout.shard(full, lp.spec.split, tp.rank, tp.size)
        value = layout.expert_shard(value, lp.spec, expert_rank, tp.expert.size)
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(
                f"{lp.key}: shape {tuple(value.shape)} does not fit parameter {tuple(param.shape)}"
            )
        param.copy_(value.to(param.dtype))
        _mark_tensor_parallel(param, lp.spec.split, tp.size)


def _mark_tensor_parallel(param: nn.Parameter, split: str, size: int) -> None:
    """megatron's attributes that DeepSpeed's grad-norm uses to count a sharded tensor on every rank
    (megatron only sets them when it initializes weights itself, which we skip; biases it always marks)."""
    if split != "replicated" and size > 1 and not hasattr(param, "tensor_model_parallel"):
        dim = {"row": 1, "expert_gate_up": 1, "expert_row": 2}.get(split, 0)
        set_tensor_model_parallel_attributes(param, True, dim, 1)
