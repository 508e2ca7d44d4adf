"""The DeepSpeed side: its JSON config generated from the bigtrain config, optimizer, LR schedule,
and ``deepspeed.initialize``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bigtrain import compat
from bigtrain.config import Config
from bigtrain.distributed import Dist, MegatronMPU
from bigtrain.planner import reduce_bucket_elements


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """DeepSpeed's config, derived entirely from ours (users never write one by hand)."""
    z = cfg.zero
    zero: dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "reduce_bucket_size": reduce_bucket_elements(cfg, cfg.parallel.tensor, cfg.parallel.pipeline),
        "allgather_bucket_size": z.allgather_bucket_size,
        "contiguous_gradients": True,
    }
    if z.stage == 3:
        zero["stage3_param_persistence_threshold"] = z.stage3_param_persistence_threshold
        zero["stage3_prefetch_bucket_size"] = z.stage3_prefetch_bucket_size
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.derived.grad_accum_steps,
        # 0 means "no clipping", but DeepSpeed then skips the norm; a huge threshold keeps it computed.
        "gradient_clipping": cfg.optim.grad_clip or 1e30,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # bigtrain logs itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.precision != "fp32" and z.stage == 0:
        # Mixed precision at ZeRO-0 runs as ZeRO-1: identical maths, optimizer states sharded over
        # data-parallel ranks. DeepSpeed 0.19's own stage-0 paths are wrong: bf16 trains pure bf16
        # weights, and fp16 (FP16_Optimizer) divides by the loss scale gradients that engine.backward
        # never multiplied by it (updates ~65536x too small: deepspeedai/DeepSpeed PR #8393).
        zero["stage"] = 1
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if zero["stage"] == 1:  # fp32 masters and fp32 gradient accumulation: DeepSpeed's bf16 optimizer
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif cfg.precision == "fp16":
        f = cfg.fp16
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": f.initial_scale_power,
            "loss_scale_window": f.loss_scale_window,
            "hysteresis": f.hysteresis,
            "min_loss_scale": f.min_loss_scale,
        }
    if cfg.precision != "fp32":  # DeepSpeed reduces in the training precision unless told otherwise
        ds["communication_data_type"] = "fp32" if z.grad_reduce_dtype == "fp32" else cfg.precision
        # under context parallelism DeepSpeed reduces in this one instead (its Ulysses setting)
        ds["seq_parallel_communication_data_type"] = ds["communication_data_type"]
    if cfg.parallel.pipeline > 1:
        ds["pipeline"] = {"activation_checkpoint_interval": 0}
        if cfg.parallel.sequence_parallel:
            # DeepSpeed sends 1/tp of a stage's output per tensor rank and all-gathers it on the next
            # stage, which assumes the tensor ranks hold the same activations; under sequence
            # parallelism each holds its own [s/tp, b, h] shard, so every rank sends its whole tensor
            # (mixing the shards: 3e-2 relative loss error by step 10 at TP2 x PP2)
            ds["pipeline"].update(pipe_partitioned=False, grad_partitioned=False)
    return ds


class LRSchedule:
    """Linear warmup to ``lr``, then cosine/linear decay to ``min_lr`` (a LambdaLR factor, picklable)."""

    def __init__(self, cfg: Config):
        o = cfg.optim
        self.lr, self.min_lr, self.warmup, self.decay = o.lr, o.min_lr, o.warmup_steps, o.decay
        self.decay_steps = o.decay_steps or cfg.train.steps

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.lr
        span = max(1, self.decay_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        if self.decay == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * factor

    def __call__(self, step: int) -> float:
        return self.lr_at(step) / self.lr if self.lr else 0.0


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, lr_scales: dict[int, float] | None = None
) -> list[dict[str, Any]]:
    """No weight decay on norms (1-D tensors), decay on matrices; frozen parameters left out.
    ``lr_scales`` (id(param) -> factor, layer-wise decay) splits groups further, each with lr*factor."""
    if not lr_scales:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]
    if lr is None:
        raise ValueError("param_groups: lr_scales need the base lr")
    by_key: dict[tuple[float, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            wd = weight_decay if p.ndim >= 2 else 0.0
            by_key.setdefault((lr_scales.get(id(p), 1.0), wd), []).append(p)
    return [
        {"params": ps, "weight_decay": wd, "lr": lr * scale, "lr_scale": scale}
        for (scale, wd), ps in sorted(by_key.items(), key=lambda kv: -kv[0][0])
    ]


def layer_lr_scales(model: nn.Module, cfg: Config) -> dict[int, float]:
    """id(param) -> layer_decay**depth: the head and final norm 1, block i decay**(L+1-i), embedding
    decay**(L+1) (discriminative fine-tuning: layers near the input move least)."""
    from bigtrain.registry import local_parameters

    L, decay = cfg.model.num_layers, cfg.optim.layer_decay
    scales = {}
    for lp, param in local_parameters(model, cfg).values():
        depth = L + 1 - lp.index if lp.index <= L else 0
        scales[id(param)] = decay**depth
    return scales


def expert_parameters(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    """This rank's stacked expert weights (``layout.is_expert``); none without ``model.moe``."""
    from bigtrain.models import layout
    from bigtrain.registry import local_parameters

    if not cfg.model.moe.num_experts:
        return []
    return [param for lp, param in local_parameters(model, cfg).values() if layout.is_expert(lp.spec)]


def split_expert_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``groups`` with the expert parameters DeepSpeed knows (``allreduce=False``, set by
    ``compat.deepspeed_expert_groups``) moved into groups of their own (``'moe': True``, ``'name'``: the
    expert group's), which ZeRO-1/2 shard over the expert-data-parallel ranks; unchanged without them."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if not any(is_moe_param(p) for g in groups for p in g["params"]):
        return groups
    named = [{**g, "name": f"group{i}"} for i, g in enumerate(groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW/Adam: DeepSpeed's CPU Adam under optimizer offload, DeepSpeed's fused Adam on GPU, torch's on
    CPU; SGD (momentum) and RMSprop: torch's. Only trainable parameters are given to the optimizer."""
    o = cfg.optim
    scales = layer_lr_scales(model, cfg) if o.layer_decay != 1.0 else None
    groups = split_expert_groups(param_groups(model, o.weight_decay, o.lr, scales))
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    if o.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=o.lr, alpha=o.beta2, eps=o.eps, momentum=o.momentum)
    decoupled = o.name == "adamw"
    lr, betas, eps = o.lr, (o.beta1, o.beta2), o.eps
    if cfg.zero.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=decoupled, lr=lr, betas=betas, eps=eps)
    if device.type == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=decoupled, lr=lr, betas=betas, eps=eps)
    return (torch.optim.AdamW if decoupled else torch.optim.Adam)(groups, lr=lr, betas=betas, eps=eps)


def initialize_engine(cfg: Config, model: nn.Module, dist: Dist) -> Any:  # deepspeed's (untyped) engine
    """Wrap the model in DeepSpeed's engine (pipeline engine when the model is a PipelineModule)."""
    import deepspeed

    model.to(dist.device)
    # expert parallelism: expert weights are reduced and sharded over their expert-data-parallel group
    with compat.deepspeed_expert_groups(expert_parameters(model, cfg), cfg.parallel.expert):
        optimizer = build_optimizer(cfg, model, dist.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg))
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg),
            mpu=None if cfg.parallel.pipeline > 1 else MegatronMPU(),
            dist_init_required=False,
        )
    # framework patches (bigtrain/compat.py lists each one with its upstream cause and test)
    compat.guard_torch_optimizer_step(engine.optimizer)
    compat.record_fp32_grad_norm(engine)
    compat.share_fp32_master_partitions(engine)
    # gradients are reduced over data x context ranks (context ranks hold parts of the same samples)
    reduced_over = cfg.derived.data_parallel_size * cfg.parallel.context
    compat.skip_identity_allreduce(engine, reduced_over, cfg.parallel.pipeline)
    if dist.device.type == "cuda" and dist.is_main:
        _log_attention_kernel(cfg, dist.device)
    return engine


def _log_attention_kernel(cfg: Config, device: torch.device) -> None:
    """Say which SDPA kernel attention really gets (profiled once): a silent fallback from flash to the
    math kernel costs memory (a seq x seq matrix per head) and speed."""
    from bigtrain.metrics import console
    from bigtrain.perf import attention_kernel

    kernel = attention_kernel(cfg, device)
    note = "" if kernel in ("flash", "cudnn") else " (not flash: check precision, head size, torch build)"
    console(f"attention: SDPA {kernel} kernel on {torch.cuda.get_device_name(device)}{note}")
