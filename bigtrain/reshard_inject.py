"""Resume at another layout: the optimizer state of a checkpoint put into the live engine (issue 17).

The target half of resharding; :mod:`bigtrain.reshard` reads the source (any saved layout, by layout
key). Decision and measurements: ``docs/design/reshard.md`` and :mod:`bigtrain.reshard`'s docstring.
In short, DeepSpeed is never handed files of a foreign layout: the model is built at the new layout,
its weights loaded from the checkpoint's layout-free ``weights/`` before ``deepspeed.initialize`` (so
every wrapper clones its low-precision copies from the right values), and then, one parameter at a
time, the full fp32 master and Adam moments are cut to this rank's tensor shard with the same
``layout.shard`` as weights-only loads and written through DeepSpeed's public state API
(``deepspeed.utils.safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``), which copies only
this rank's ZeRO fragment. ZeRO-0 has no such wrapper: the torch optimizer's state is set directly.
The layout-free rest (LR schedule, step counters, fp16 loss scale, bigtrain's training state) comes
from the checkpoint's rank-0 files.

Whether a resume needs resharding (:func:`needs_reshard`) and what it says (:func:`reshard_line`) are
decided before any process group (``pretrain.preflight``); what cannot be resharded is a resume rule
(``resume_rules.cannot_reshard``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bigtrain.config import Config
from bigtrain.distributed import Dist
from bigtrain.models import layout
from bigtrain.resume_rules import effective_stage

STATES = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------------- deciding (no process group)
def _layout_of(cfg: Config) -> tuple[int, int, int, int, bool]:
    p = cfg.parallel
    return (
        p.tensor,
        p.pipeline,
        cfg.derived.data_parallel_size * p.context,  # the ranks ZeRO partitions over
        effective_stage(cfg),
        cfg.zero.offload_optimizer,
    )


def needs_reshard(meta: dict[str, Any], saved: Config, cfg: Config) -> bool:
    """Whether resuming the checkpoint (``meta``: its bigtrain.json, ``saved``: its config) at ``cfg``'s
    layout needs the optimizer state resharded, i.e. DeepSpeed's own load cannot read it: another tensor
    or pipeline size or stage partitioning, ZeRO stage, optimizer offload, or data-parallel size with a
    partitioned optimizer; or a checkpoint ``tools/reshard_checkpoint.py`` wrote (no DeepSpeed files)."""
    if meta.get("optimizer_format") == "layout_free":
        return True
    (t0, p0, d0, z0, o0), (t1, p1, d1, z1, o1) = _layout_of(saved), _layout_of(cfg)
    same_partition = p1 == 1 or saved.parallel.partition_method == cfg.parallel.partition_method
    repadded = saved.derived.padded_vocab_size != cfg.derived.padded_vocab_size
    return (t0, p0, z0, o0) != (t1, p1, z1, o1) or not same_partition or (d0 != d1 and z0 > 0) or repadded


def _describe(t: int, p: int, d: int, cfg: Config, other: Config, c: int = 1) -> str:
    """``TP2 PP2 DP2 ZeRO-1``, with what else differs from ``other``: the pipeline partition, the padded
    vocabulary, optimizer offload."""
    pipe = (
        f" ({cfg.parallel.partition_method})"
        if p > 1 and cfg.parallel.partition_method != other.parallel.partition_method
        else ""
    )
    vocab = cfg.derived.padded_vocab_size
    padded = f" vocab {vocab}" if vocab != other.derived.padded_vocab_size else ""
    offload = "+offload" if cfg.zero.offload_optimizer else ""
    context = f" CP{c}" if c > 1 else ""
    return f"TP{t} PP{p}{pipe} DP{d}{context} ZeRO-{cfg.zero.stage}{offload}{padded}"


def reshard_line(tag: str, meta: dict[str, Any], saved: Config, cfg: Config) -> str:
    """The one line pre-flight prints: ``resuming step_00000120 saved at TP2 PP2 DP2 ZeRO-1 into TP1 PP1
    DP4 ZeRO-2 (resharding optimizer state)``."""
    was = meta["layout"]
    source = _describe(
        was["tensor"], was["pipeline"], was["data_parallel"], saved, cfg, was.get("context", 1)
    )
    origin = meta.get("resharded_from")
    if origin:  # written by tools/reshard_checkpoint.py: say the layout it was trained at
        source += f" (resharded offline from TP{origin['tensor']} PP{origin['pipeline']})"
    p = cfg.parallel
    target = _describe(p.tensor, p.pipeline, cfg.derived.data_parallel_size, cfg, saved, p.context)
    return f"resuming {tag} saved at {source} into {target} (resharding optimizer state)"


# ---------------------------------------------------------------------------- injecting (in the engine)
def _repad(full: torch.Tensor, lp: layout.LayerParam, cfg: Config) -> torch.Tensor:
    """A vocab-split tensor at the saved padded vocabulary, at this run's (rows past the true vocab are
    padding: never a target, their logits masked, so zero is their value and their moments)."""
    padded = cfg.derived.padded_vocab_size
    if lp.spec.split != "vocab" or full.shape[0] == padded:
        return full
    assert cfg.model.vocab_size is not None
    out = full.new_zeros(padded, *full.shape[1:])
    n = min(cfg.model.vocab_size, full.shape[0])
    out[:n] = full[:n]
    return out


def _new_step(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], device: torch.device, step: int
) -> Any:
    """Adam's ``step`` entry as this optimizer creates it: DeepSpeed's CPU/fused Adam keep an int, torch's
    Adam a 0-d float32 tensor (on the parameter's device when fused or capturable)."""
    if type(optimizer).__module__.startswith("deepspeed."):
        return step
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=device if on_device else "cpu")


def _base_optimizer(engine: Any) -> tuple[torch.optim.Optimizer, bool]:
    """The torch optimizer that holds Adam's state, and whether DeepSpeed wraps it (ZeRO, bf16)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer) and not isinstance(opt, torch.optim.Optimizer):
        return inner, True
    return opt, False


def _create_state(engine: Any, base: torch.optim.Optimizer, step: int) -> None:
    """Adam's state for every tensor the base optimizer steps (a ZeRO flat partition, or a model
    parameter at ZeRO-0), zero moments at ``step``: torch creates it lazily at the first step, and the
    moments are then overwritten per parameter. ZeRO-3 hands its flat sub-groups to the base optimizer
    only during a step (``stage3.py`` ``_set_fp32_optimizer_param_groups``): taken from the wrapper."""
    flats = [(group, flat) for group in base.param_groups for flat in group["params"]]
    group = base.param_groups[0]
    flats += [(group, flat) for flat in getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])]
    for group, flat in flats:
        base.state[flat] = {
            "step": _new_step(base, group, flat.device, step),
            **{s: torch.zeros_like(flat, memory_format=torch.preserve_format) for s in STATES},
        }


@torch.no_grad()
def inject(engine: Any, cfg: Config, dist: Dist, ckpt: Path) -> dict[str, Any]:
    """Put checkpoint ``ckpt``'s fp32 masters and Adam moments (saved at any layout) into ``engine``
    (built at ``cfg``'s layout, its weights already loaded from ``ckpt``), and its LR schedule, step
    counters and fp16 loss scale; returns bigtrain's saved training state (step, consumed samples, ...).

    Every rank reads only what it needs, one parameter at a time, and writes only its own fragment
    (no collective, except with ``debug.check_reshard``). Raises ValueError naming the checkpoint when
    a parameter this rank trains has no saved state, or when shapes disagree."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from bigtrain.models.parallelize import tensor_parallel
    from bigtrain.registry import local_parameters
    from bigtrain.reshard import open_optimizer_state

    source = open_optimizer_state(ckpt)  # lazy: one key's tensors at a time, read when asked
    zero3_events = hasattr(engine.optimizer, "checkpoint_event_prologue")
    if zero3_events:  # ZeRO-3: release gathered parameters first, as DeepSpeed's own load does
        engine.optimizer.checkpoint_event_prologue()
    base, wrapped = _base_optimizer(engine)
    _create_state(engine, base, source.step)
    if wrapped and hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 and bf16: link each parameter's fragment to the state just created (DeepSpeed does it
        # at its first step; ``safe_set_full_optimizer_state`` writes through these links)
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    tp = tensor_parallel(cfg)
    held = set(source.keys())
    expected: dict[str, dict[str, torch.Tensor]] = {}
    for key, (lp, param) in local_parameters(engine.module, cfg).items():
        if not param.requires_grad:
            continue  # frozen: its weights came with the weights-only load; no optimizer state
        if key not in held:
            raise ValueError(f"{ckpt}: no optimizer state for {key}, which this run trains")
        local = {}
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3: the data is this rank's partition
        for what, full in source.tensors(key).items():
            value = layout.shard(_repad(full, lp, cfg), lp.spec.split, tp.rank, tp.size)
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"{ckpt}: {key} {what} shards to {tuple(value.shape)}, the parameter is {shape}"
                )
            if what != "master" and cfg.debug.reshard_zero_moments:
                value = torch.zeros_like(value)  # the wrong-on-purpose control (a weights-only load)
            local[what] = value.to(param.device)
        if wrapped:
            safe_set_full_fp32_param(param, local["master"])
            for s in STATES:
                safe_set_full_optimizer_state(param, local[s], s)
        else:  # ZeRO-0 fp32: the parameter is the master, the torch optimizer's state is keyed by it
            param.data.copy_(local["master"])
            for s in STATES:
                base.state[param][s].copy_(local[s])
        if cfg.debug.check_reshard:
            expected[key] = local
    _update_low_precision(engine)
    if zero3_events:  # ZeRO-3: persistent (small, always gathered) parameters re-gathered from partitions
        engine.optimizer.checkpoint_event_epilogue()
    _restore_counters(engine, cfg, source)
    if cfg.debug.check_reshard:
        check(engine, cfg, dist, expected, ckpt)
    return dict(source.client_state)


def _update_low_precision(engine: Any) -> None:
    """The model's (bf16/fp16, or fp32 ZeRO) parameters from the injected masters, as DeepSpeed's step
    does: after a load at start-up they already agree, but a loss-spike rollback to a checkpoint of the
    previous layout injects into a trained engine. ZeRO-1/2 and bf16: ``update_lp_params`` (an
    all-gather over the data-parallel group); ZeRO-3: each rank's partition from its masters; ZeRO-0:
    the parameters are the masters."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):
        opt.update_lp_params()
    elif hasattr(opt, "fp32_partitioned_groups_flat"):
        for master, low in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat):
            if master.numel() and master.data_ptr() != low.data_ptr():
                low.data.copy_(master.data)


def _restore_counters(engine: Any, cfg: Config, source: Any) -> None:
    """The layout-free state DeepSpeed's own load would restore: step counters, the LR schedule (its
    configured values put back by the caller, ``checkpoint._keep_configured``) and fp16's loss scale."""
    engine.global_steps = source.global_steps
    engine.global_samples = source.global_samples
    engine.skipped_steps = source.skipped_steps
    if source.lr_scheduler is not None:
        # the position only: the saved LambdaLR has one lambda and base LR per saved parameter group,
        # and another layout (a pipeline stage, layer decay) has other groups; the caller rebuilds those
        scheduler = engine.lr_scheduler
        scheduler.last_epoch = source.lr_scheduler["last_epoch"]
        scheduler._step_count = source.lr_scheduler["_step_count"]
    scaler, saved = getattr(engine.optimizer, "loss_scaler", None), source.loss_scaler
    if scaler is not None and saved is not None and cfg.precision == "fp16":
        for name in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis"):
            if hasattr(saved, name) and hasattr(scaler, name):
                setattr(scaler, name, getattr(saved, name))


def check(
    engine: Any, cfg: Config, dist: Dist, expected: dict[str, dict[str, torch.Tensor]], ckpt: Path
) -> None:
    """debug.check_reshard: read every injected master and moment back from the live optimizer (full
    tensor-parallel-local tensors, gathered over ZeRO's partitions: a collective) and require them bitwise
    equal to what was injected; rank 0 says how many parameters were checked. Raises RuntimeError."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from bigtrain.metrics import console
    from bigtrain.registry import local_parameters

    base, wrapped = _base_optimizer(engine)
    wrong = []
    for key, (_, param) in local_parameters(engine.module, cfg).items():
        if key not in expected:
            continue
        if wrapped:
            got = {"master": safe_get_full_fp32_param(param)}
            got.update({s: safe_get_full_optimizer_state(param, s) for s in STATES})
        else:
            got = {"master": param.detach(), **{s: base.state[param][s] for s in STATES}}
        for what, value in expected[key].items():
            live = got[what]
            if live is None or not torch.equal(live.float().cpu().reshape(value.shape), value.float().cpu()):
                wrong.append(f"{key} {what}")
    gathered: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, (sorted(expected), wrong))
    keys = {k for part in gathered for k in part[0]}
    problems = [w for part in gathered for w in part[1]]
    if problems:
        raise RuntimeError(
            f"debug.check_reshard: {ckpt}: injected state differs from the checkpoint's: {problems}"
        )
    if dist.is_main:
        console(f"debug.check_reshard: {len(keys)} parameters x 3 states bitwise equal")
