"""Every run-time patch of DeepSpeed, torch and megatron-core behaviour, in one place.

bigtrain changes a few framework objects after they are built (a method replaced, a private attribute
set, a module global moved). Each patch is one function here; its docstring names the upstream issue or
code it works around, the versions it was checked against and the test that fails without it. The
patches target one DeepSpeed minor and one megatron-core minor: ``check_versions`` (called first by
``bigtrain.distributed.init_distributed``) refuses any other, and ``setup.py`` pins the same ranges.
Re-check every row below (disable the patch, run its test) before moving a pin.

All rows checked against deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.

Patch table (``tests/test_compat.py`` parses it: every row's test must exist)::

    patch                         | works around                                          | fails without it
    guard_torch_optimizer_step    | torch optimizers have no non-finite step skip          | tests/training/test_reliability.py::test_nonfinite_skip_leaves_parameters_bitwise_unchanged
    record_fp32_grad_norm         | DeepSpeedEngine.clip_fp32_gradients drops the norm     | tests/test_compat.py::test_fp32_grad_norm_is_recorded_and_a_nonfinite_one_skips_the_step
    share_fp32_master_partitions  | ZeRO clones fp32 masters of fp32 parameters            | tests/test_planner.py::test_zero_state_prediction_matches_accounting_dp2
    compact_optimizer_state_dict  | torch.save writes a view's whole storage (torch#40157) | tests/training/test_reliability.py::test_corrupted_then_truncated_newest_checkpoint_falls_back
    skip_identity_allreduce       | DeepSpeed all-reduces over a data-parallel group of 1  | tests/test_compat.py::test_identity_allreduce_is_skipped_at_one_data_parallel_rank
    single_process_rank           | megatron BlendedDataset calls get_rank() without a PG  | tests/data/test_blend.py::test_blend_mix_matches_weights_over_10000_samples
    uncache_gpt_masks             | megatron GPTDataset mask cache (Megatron-LM#1711)      | tests/training/test_loss_normalization.py::test_pad_masks_do_not_depend_on_which_sample_is_read_first
    default_group_timeout         | torch new_group() takes the 30-minute module default   | tests/test_compat.py::test_default_group_timeout_reaches_groups_created_later
    EngineFileRecorder            | DeepSpeed names no files written by save_checkpoint    | tests/training/test_reliability.py::test_kill_at_every_moment_of_a_save_then_relaunch
    set_scheduler_last_lr         | LambdaLR keeps _last_lr from the checkpoint            | tests/test_compat.py::test_scheduler_last_lr_follows_the_restored_groups
    optimizer_settings            | DeepSpeed's load restores the saved clip / fp16 scaler | tests/training/test_resume.py::test_data_parallel_size_and_honoured_changes_at_zero1
    scale_pipeline_loss           | PipelineEngine reads module.loss_fn on every step      | tests/training/test_reliability.py::test_nonfinite_skip_leaves_parameters_bitwise_unchanged
    count_tied_head_params        | PipelineModule marks a whole tied module replicated    | tests/training/test_bert.py::test_bert_layouts_match_single_process
    megatron_buffers_on           | megatron-core allocates SP buffers on the CUDA device  | tests/training/test_parallel_equivalence.py::test_sequence_parallel_matches_single_process
    megatron_moe_on               | megatron-core's MoE dispatcher needs CUDA streams      | tests/models/test_moe.py::test_megatron_moe_needs_the_patch_on_cpu
    deepspeed_expert_groups       | DeepSpeed sees MoE only in its own deepspeed.moe layer | tests/training/test_moe_parallel.py::test_expert_parallel_matches_single_process

Not patches, so not here: LoRA (``bigtrain/finetune/lora.py``) swaps the class of bigtrain's own
projection modules for a subclass of the same class (public ``forward`` only), and the tied embedding
calls DeepSpeed's public ``register_external_parameter``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# (distribution, major.minor the patches target); setup.py pins the same minors.
TARGET_VERSIONS = {"deepspeed": "0.19", "megatron-core": "0.16"}


class VersionMismatch(RuntimeError):
    """An installed framework's minor version is not the one bigtrain's patches were checked against."""


def check_versions() -> None:
    """Raise ``VersionMismatch`` naming installed and required versions when deepspeed or megatron-core
    is not the minor version this module's patches target (a patch of private behaviour can break
    silently, e.g. an attribute it sets that nothing reads any more)."""
    wrong = []
    for name, target in TARGET_VERSIONS.items():
        installed = metadata.version(name)
        if ".".join(installed.split(".")[:2]) != target:
            wrong.append(f"{name} {installed} (needs {target}.x)")
    if wrong:
        raise VersionMismatch(
            f"installed {', '.join(wrong)}: bigtrain/compat.py patches framework internals checked against "
            f"deepspeed {TARGET_VERSIONS['deepspeed']}.x and megatron-core {TARGET_VERSIONS['megatron-core']}.x; "
            "install those (pip install -e .) or re-check every patch in bigtrain/compat.py first"
        )


# ------------------------------------------------------------------------------------ DeepSpeed engine
def guard_torch_optimizer_step(optimizer: Any) -> None:
    """A plain torch optimizer (fp32, no ZeRO) skips ``step()`` while ``optimizer.overflow`` is set.

    DeepSpeed's ZeRO and bf16 optimizers skip a step whose global gradient norm is not finite (setting
    ``optimizer.overflow``, so the engine counts it in ``skipped_steps`` and leaves the LR schedule
    alone); under fp32 without ZeRO the engine steps the client torch optimizer directly
    (deepspeed/runtime/engine.py ``DeepSpeedEngine._take_model_step``), which has no such check. No
    upstream issue found. ``record_fp32_grad_norm`` sets the flag. Other optimizers: unchanged.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/training/test_reliability.py::test_nonfinite_skip_leaves_parameters_bitwise_unchanged
    (``fp32-guard``: "non-finite loss nan but the update was applied; stopping")."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return
    # the same optimizer, typed loosely: torch's Optimizer declares neither DeepSpeed's ``overflow``
    # flag nor an assignable ``step``
    patched: Any = optimizer
    patched.overflow = False
    torch_step = optimizer.step

    @functools.wraps(torch_step)  # keeps the LR scheduler's wrapper marks (no spurious warning)
    def guarded_step(*args: Any, **kwargs: Any) -> Any:
        if patched.overflow:
            return None  # parameters and optimizer state stay bitwise unchanged
        return torch_step(*args, **kwargs)

    patched.step = guarded_step


def record_fp32_grad_norm(engine: Any) -> None:
    """Replace ``engine.clip_fp32_gradients`` (fp32 without ZeRO) by a tensor/pipeline-aware clip that
    keeps the norm (``engine.get_global_grad_norm()``) and flags a non-finite one as an overflow.

    deepspeed/runtime/engine.py ``DeepSpeedEngine.clip_fp32_gradients`` calls
    deepspeed/runtime/utils.py ``clip_grad_norm_`` and throws the norm away (``_global_grad_norm``
    stays None); that function counts a parameter that is not tensor-parallel (norm weights) only on
    model-parallel rank 0, so under a pipeline only the first stage's. This uses what DeepSpeed's ZeRO
    and bf16 optimizers use: ``get_global_norm_of_tensors`` over the gradients of tensor-parallel
    parameters on every TP rank plus the others on TP rank 0 of every stage, tied pipeline copies
    (``ds_pipe_replicated``) left out; expert weights (``deepspeed_expert_groups``) summed over the
    expert-parallel group, whose ranks hold different experts. No upstream issue found for the dropped norm
    (deepspeedai/DeepSpeed#6767: maintainers confirm clipping lives in the optimizers).

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/test_compat.py::test_fp32_grad_norm_is_recorded_and_a_nonfinite_one_skips_the_step
    (``get_global_grad_norm()`` is None)."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.utils import (
        clip_tensors_by_global_norm,
        get_global_norm_of_tensors,
        is_invalid_grad_norm,
        is_model_parallel_parameter,
    )
    from megatron.core import parallel_state

    def clip_and_record() -> None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        params = [p for p in engine.module.parameters() if p.grad is not None]
        counted = [
            p
            for p in params
            if not getattr(p, "ds_pipe_replicated", False)
            and (is_model_parallel_parameter(p) or tp_rank == 0)
        ]
        norm = get_global_norm_of_tensors([p.grad for p in counted if not is_moe_param(p)], mpu=engine.mpu)
        experts = [p.grad for p in counted if is_moe_param(p)]
        if experts:  # expert ranks hold different experts: their squares are summed over the expert group
            squares = get_global_norm_of_tensors(experts, mpu=engine.mpu) ** 2
            torch.distributed.all_reduce(squares, group=parallel_state.get_expert_model_parallel_group())
            norm = norm if is_invalid_grad_norm(norm) else (norm**2 + squares).sqrt()
        if hasattr(engine.optimizer, "overflow"):
            engine.optimizer.overflow = is_invalid_grad_norm(norm)
        if not getattr(engine.optimizer, "overflow", False):
            clip_tensors_by_global_norm([p.grad for p in params], engine.gradient_clipping(), norm)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_and_record


def share_fp32_master_partitions(engine: Any) -> None:
    """fp32 training under ZeRO 1-3: point each fp32 master partition at the (already fp32) parameter
    partition's storage instead of a clone, saving 4/dp bytes per parameter.

    ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``) always
    clones ``single_partition_of_fp32_groups``; ZeRO-3 (deepspeed/runtime/zero/stage3.py
    ``_create_fp32_partitions``) means to share them but compares a ``torch.device`` with the str
    ``self.device`` ("cpu"/"cuda:0": always unequal). No upstream issue found. The copy master ->
    parameters after every step becomes a copy onto itself; ``_link_all_hp_params`` (private) re-points
    the parameters' views of their master fragment, which checkpoints read. Optimizer offload: skipped
    (masters on the CPU). A checkpoint load that re-seats a master makes it a clone again. A shared
    master views the whole flat parameter buffer, so ``compact_optimizer_state_dict`` follows.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/test_planner.py::test_zero_state_prediction_matches_accounting_dp2
    (ZeRO-1 at DP=2 holds 12.0 bytes per parameter, not 10: the planner's prediction is 17% off)."""
    opt = engine.optimizer
    if getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False):
        return  # masters live on the CPU, parameters on the device
    pairs = []
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        for i, master in enumerate(opt.single_partition_of_fp32_groups):
            rank = torch.distributed.get_rank(group=opt.real_dp_process_group[i])
            pairs.append((master, opt.parallel_partitioned_bit16_groups[i][rank]))
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        pairs = list(zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat))
    shared = False
    for master, param in pairs:
        same = master.dtype == param.dtype and master.shape == param.shape and master.device == param.device
        if same and master.data_ptr() != param.data_ptr() and torch.equal(master, param):
            master.data = param.data
            shared = True
    if shared and hasattr(opt, "_link_all_hp_params"):
        opt._link_all_hp_params()  # parameters' views of their master fragment (read by checkpoints)
    if shared:
        compact_optimizer_state_dict(opt)


def compact_optimizer_state_dict(optimizer: Any) -> None:
    """Wrap ``optimizer.state_dict`` so that every tensor viewing a larger storage is saved as a compact
    copy (``compact_views``).

    torch.save writes a view's entire storage (documented: pytorch/pytorch#40157, "saving and loading
    tensors preserves views"); a shared fp32 master (``share_fp32_master_partitions``) views the rank's
    whole flat parameter buffer, so without this every ZeRO optimizer shard would hold all parameters.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/training/test_reliability.py::test_corrupted_then_truncated_newest_checkpoint_falls_back
    (each ZeRO-1 optimizer shard over 1.75x the weights file)."""
    state_dict = optimizer.state_dict
    optimizer.state_dict = functools.wraps(state_dict)(lambda *a, **k: compact_views(state_dict(*a, **k)))


def compact_views(obj: Any) -> Any:
    """``obj`` (tensors in nested dicts, lists, tuples) with every tensor that views a larger storage
    replaced by a compact clone; other tensors and values are returned as they are (same objects)."""
    if torch.is_tensor(obj):
        if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
            return obj.clone()
        return obj
    if isinstance(obj, dict):
        return type(obj)((k, compact_views(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(compact_views(v) for v in obj)
    return obj


def skip_identity_allreduce(engine: Any, data_parallel_size: int, pipeline: int) -> None:
    """One data-parallel rank (``data_parallel_size``: the ranks gradients are reduced over, data x
    context), no pipeline: turn off the engine's gradient all-reduce after backward
    (``engine.enable_backward_allreduce``) where the optimizer does not depend on that path.

    deepspeed/runtime/engine.py ``DeepSpeedEngine.allreduce_gradients`` flattens every gradient into
    buckets, all-reduces over a group of one, divides by 1 and copies back: an identity costing 5-10%
    of a small model's CPU step. No upstream issue found. Applied for the torch optimizer and the bf16
    optimizer (it accumulates its fp32 gradients before the reduction); ZeRO-1/2 move gradients into
    their partitions on that path, so they keep it. fp32/fp16 steps are bitwise unchanged; bf16 loses
    a bf16 round trip of its fp32 gradients.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/test_compat.py::test_identity_allreduce_is_skipped_at_one_data_parallel_rank
    (a speed patch: no end-to-end result depends on it)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    opt = engine.optimizer
    plain = isinstance(opt, BF16_Optimizer) or not isinstance(opt, ZeROOptimizer)
    if data_parallel_size == 1 and pipeline == 1 and plain:
        engine.enable_backward_allreduce = False


def expert_group_name(size: int) -> str:
    """DeepSpeed's name of the expert-parallel groups of ``size`` ranks (deepspeed/utils/groups.py)."""
    return f"ep_size_{size}"


@contextlib.contextmanager
def deepspeed_expert_groups(experts: list[torch.nn.Parameter], size: int) -> Iterator[None]:
    """Make DeepSpeed reduce, shard, broadcast and checkpoint ``experts`` (this rank's stacked expert
    weights) as expert parameters of megatron-core's expert-parallel groups of ``size`` ranks; DeepSpeed
    engines built inside the block see MoE layers (``has_moe_layers``). ``size`` 1: a no-op.

    deepspeed/runtime/engine.py ``DeepSpeedEngine._configure_distributed_model`` sets
    ``has_moe_layers`` only for its own ``deepspeed.moe.layer.MoE`` modules::

        for _, module in self.module.named_modules():
            if isinstance(module, MoE):
                self.has_moe_layers = True

    and everything else keys on that flag plus two parameter attributes (``allreduce=False``,
    ``group_name``) and the groups registered in deepspeed/utils/groups.py's ``_EXPERT_PARALLEL_GROUP``
    and ``_EXPERT_DATA_PARALLEL_GROUP`` dicts (private, filled by ``_create_expert_and_data_parallel``
    with groups of its own rank order): ``_broadcast_model`` broadcasts expert weights over the
    expert-data-parallel group only, ``_reduce_expert_gradients`` (ZeRO-0) and ZeRO-1/2 reduce their
    gradients over it and divide by the full data-parallel size (each rank's experts got every rank's
    tokens through the all-to-all), ZeRO-1/2 shard their optimizer groups (``'moe': True``, see
    ``bigtrain.engine.build_optimizer``) over it, and ``save_checkpoint`` writes the ZeRO-0 optimizer
    state per expert rank (``expp_rank_R_mp_rank_XX_optim_states.pt``). bigtrain's experts are
    megatron-core's (``bigtrain.models.moe``), so here megatron's expert-parallel and expert-data-parallel
    groups are registered under DeepSpeed's name (``ep_size_{size}``), the parameters marked, and the
    engine class's ``_configure_distributed_model`` wrapped while the block runs to set the flag.
    DeepSpeed's model file still holds rank 0's experts only: ``bigtrain.checkpoint.resume`` reads them
    from bigtrain's weights files (all experts). No upstream issue found (DeepSpeed's AutoEP covers HF
    models only).

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/training/test_moe_parallel.py::test_expert_parallel_matches_single_process
    (DeepSpeed broadcasts rank 0's experts to every rank: the step-1 loss is already 1.4e-4 off)."""
    if size == 1:
        yield
        return
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import groups
    from megatron.core import parallel_state

    name = expert_group_name(size)
    for group, ranks, found in (
        (
            groups._EXPERT_PARALLEL_GROUP,
            groups._EXPERT_PARALLEL_GROUP_RANKS,
            parallel_state.get_expert_model_parallel_group(),
        ),
        (
            groups._EXPERT_DATA_PARALLEL_GROUP,
            groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
            parallel_state.get_expert_data_parallel_group(),
        ),
    ):
        group[name] = found
        ranks[name] = torch.distributed.get_process_group_ranks(found)
    for param in experts:
        # the attributes deepspeed.moe.utils.is_moe_param and DeepSpeed's reductions read
        setattr(param, "allreduce", False)  # noqa: B010 (not declared on Parameter)
        setattr(param, "group_name", name)  # noqa: B010
    original = DeepSpeedEngine._configure_distributed_model

    def configure(engine: Any, model: Any) -> None:
        original(engine, model)
        engine.has_moe_layers = True

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original


class EngineFileRecorder:
    """Records the files DeepSpeed's checkpoint engine writes on this rank (model, optimizer and layer
    files all go through ``engine.checkpoint_engine.save``, wrapped until ``close``), so that each rank
    can fsync and checksum its own files.

    ``DeepSpeedEngine.save_checkpoint`` returns no file names and its naming differs by ZeRO stage and
    pipeline (deepspeed/runtime/engine.py ``_get_ckpt_name``, ``_get_zero_ckpt_name``, pipe
    ``ckpt_layer_path``). No upstream issue found. ``on_write(n)`` is called after the n-th file (the
    ``first_engine_file`` fault point). Without it rank 0 still lists unclaimed files in the manifest
    (``checkpoint_files.write_manifest``), but checksums them alone.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/training/test_reliability.py::test_kill_at_every_moment_of_a_save_then_relaunch
    (no SIGKILL at ``first_engine_file``)."""

    def __init__(self, engine: Any, on_write: Callable[[int], None]):
        self.engine = engine
        self.paths: list[Path] = []
        self.original = engine.checkpoint_engine.save

        def save(state_dict: Any, path: str | Path, *args: Any, **kwargs: Any) -> Any:
            result = self.original(state_dict, path, *args, **kwargs)
            self.paths.append(Path(path))
            on_write(len(self.paths))
            return result

        engine.checkpoint_engine.save = save

    def close(self) -> list[Path]:
        """Put the checkpoint engine's ``save`` back; returns the files written, in order."""
        self.engine.checkpoint_engine.save = self.original
        return self.paths


def set_scheduler_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Set the LR scheduler's private ``_last_lr`` (``get_last_lr()``, saved in its state) to its
    optimizer's current per-group ``lr``, after bigtrain rewrote those groups on resume.

    torch/optim/lr_scheduler.py ``LRScheduler.load_state_dict`` restores ``_last_lr`` from the
    checkpoint and only ``step()`` recomputes it; there is no public setter. No upstream issue found.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/test_compat.py::test_scheduler_last_lr_follows_the_restored_groups."""
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


OptimizerSettings = dict[str, Any]


def optimizer_settings(opt: Any) -> OptimizerSettings:
    """The clip (ZeRO / bf16 optimizers' ``clip_grad``) and fp16 dynamic loss-scaler settings
    (``scale_window``, ``min_scale``, ``delayed_shift``) the optimizer was built with, to put back with
    :func:`restore_optimizer_settings` after DeepSpeed's ``load_checkpoint`` overwrote them.

    deepspeed/runtime/zero/stage_1_and_2.py, bf16_optimizer.py and fp16/fused_optimizer.py
    ``load_state_dict`` restore the saved ``clip_grad`` and the pickled loss scaler whole; these are
    their private attributes. No upstream issue found (restoring them is what a resume usually wants).

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/training/test_resume.py::test_data_parallel_size_and_honoured_changes_at_zero1
    (the optimizer holds the saved clip, not ``optim.grad_clip``)."""
    scaler = getattr(opt, "loss_scaler", None)
    return {
        "clip_grad": getattr(opt, "clip_grad", None),
        "scaling": {
            k: getattr(scaler, k)
            for k in ("scale_window", "min_scale", "delayed_shift")
            if hasattr(scaler, k)
        },
    }


def restore_optimizer_settings(opt: Any, settings: OptimizerSettings, scale: float | None) -> None:
    """Put back what :func:`optimizer_settings` recorded; ``scale``: a new current loss scale (the
    configured initial scale changed), or None to keep the restored one."""
    if settings["clip_grad"] is not None:
        opt.clip_grad = settings["clip_grad"]
    scaling = settings["scaling"]
    restored = getattr(opt, "loss_scaler", None)
    if scaling and restored is not None and getattr(restored, "dynamic", False):
        if restored.delayed_shift != scaling["delayed_shift"]:
            restored.cur_hysteresis = scaling["delayed_shift"]
        for k, v in scaling.items():
            setattr(restored, k, v)
        if scale is not None:
            restored.cur_scale = scale


def scale_pipeline_loss(module: Any, multiplier: Callable[[], float]) -> None:
    """Multiply the pipeline's loss by ``multiplier()`` (debug injections: loss spikes, non-finite
    losses) by wrapping ``PipelineModule.loss_fn``, which deepspeed/runtime/pipe/engine.py
    ``PipelineEngine._exec_forward_pass`` reads on every step of the last stage; there is no hook.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/training/test_reliability.py::test_nonfinite_skip_leaves_parameters_bitwise_unchanged
    (the PP=2 case injects its spike through this)."""
    loss_fn = module.loss_fn

    def scaled(outputs: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss = loss_fn(outputs, labels)
        factor = multiplier()
        return loss if factor == 1.0 else loss * factor

    module.loss_fn = scaled


# ------------------------------------------------------------------------------------ torch.distributed
def default_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` torch's default for process groups created later without one (DeepSpeed's
    pipeline and data-parallel groups), by setting torch.distributed.distributed_c10d's module globals
    ``default_pg_timeout`` and ``default_pg_nccl_timeout`` (read by ``_get_default_timeout``).

    ``new_group()`` without ``timeout`` takes those module defaults (30 minutes; NCCL: 10), not the
    world group's timeout, and DeepSpeed passes none (deepspeed/comm/torch.py ``TorchBackend.new_group``
    takes only ``ranks``). No upstream issue found (the same gap in megatron: NVIDIA/Megatron-LM PR #723).

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/test_compat.py::test_default_group_timeout_reaches_groups_created_later."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout


# ------------------------------------------------------------------------------------ megatron-core data
@contextlib.contextmanager
def single_process_rank() -> Iterator[None]:
    """While no default process group exists, ``torch.distributed.get_rank()`` answers 0.

    megatron/core/datasets/blended_dataset.py ``BlendedDataset._build_indices`` calls
    ``torch.distributed.get_rank()`` on an index-cache miss without checking ``is_initialized()``
    (the GPT datasets do check), and so does megatron/core/datasets/masked_dataset.py
    ``MaskedWordPieceDataset._build_sample_index`` (the bert family's samples, bigtrain.data.bert), so a
    single process without a group raises "Default process group has not been initialized". No upstream
    issue found. With a group: a no-op.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/data/test_blend.py::test_blend_mix_matches_weights_over_10000_samples
    (and every single-process build of a blend: "Default process group has not been initialized")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def uncache_gpt_masks(gpt_datasets: list[Any]) -> None:
    """Make megatron-core ``GPTDataset``s build loss masks and position ids per sample.

    megatron-core 0.16 caches the first sample's loss mask and then zeroes that sample's pad positions
    in the cached tensor itself, so every later sample loses them too and which sample a rank reads
    first decides its masks (NVIDIA/Megatron-LM#1711, open PR #6981). The masks are cheap (ones and an
    arange). Sets the public-but-undocumented ``masks_and_position_ids_are_cacheable`` attribute.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/training/test_loss_normalization.py::test_pad_masks_do_not_depend_on_which_sample_is_read_first
    ("read 4 first": masks differ with the first sample read)."""
    for gpt in gpt_datasets:
        gpt.masks_and_position_ids_are_cacheable = False


def count_tied_head_params(module: Any) -> None:
    """Count a tied module's own parameters in the gradient norm on every stage that holds them.

    DeepSpeed's ``PipelineModule._index_tied_modules`` sets ``ds_pipe_replicated`` on *every* parameter
    of a tied module on all but the first of its stages, so that the tied weight is counted once in the
    gradient norm. bert's last-stage tied module is the pretraining head (bigtrain.models.bert): its
    transform, decoder bias and NSP layer live on that stage only, and left marked they would be missing
    from the norm, so clipping would differ from the single process. The flag is cleared on everything
    but the attributes DeepSpeed really keeps in sync (``tied_weight_attr``). A no-op for the decoder,
    whose tied module holds only the word embedding. No upstream issue found.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/training/test_bert.py::test_bert_layouts_match_single_process (pp2: the
    clipped updates differ; tests/training/test_bert.py::test_pp2_without_the_head_in_the_grad_norm_differs
    runs that control)."""
    for key, tied in getattr(module, "tied_modules", {}).items():
        synced = set(module.tied_weight_attrs.get(key, ()))
        for name, param in tied.named_parameters():
            if name not in synced:
                param.ds_pipe_replicated = False


class _CudaOn:
    """``torch.cuda`` as megatron-core's sequence-parallel code sees it: ``current_device()`` is ours."""

    def __init__(self, device: torch.device):
        self._device = device

    def current_device(self) -> torch.device:
        return self._device

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOn:
    """The ``torch`` module, but with :class:`_CudaOn` as its ``cuda``."""

    def __init__(self, device: torch.device):
        self.cuda = _CudaOn(device)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def megatron_buffers_on(device: torch.device) -> None:
    """Make megatron-core's sequence-parallel collectives allocate on ``device`` (the CPU under gloo).

    megatron/core/tensor_parallel/mappings.py (the sequence gather/reduce-scatter helpers),
    tensor_parallel/layers.py (the linears' all-gather and reduce-scatter buffers) and utils.py
    (``GlobalMemoryBuffer.get_tensor``) allocate with ``device=torch.cuda.current_device()``, which
    raises on a host without CUDA. No upstream issue found (megatron-core supports CUDA only). The
    name ``torch`` in those three modules is replaced by a proxy whose ``cuda.current_device()``
    returns ``device``; everything else is torch's. A no-op on CUDA.

    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/training/test_parallel_equivalence.py::test_sequence_parallel_matches_single_process"""
    if device.type == "cuda":
        return
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers, mappings

    for module in (mappings, layers, utils):
        module.torch = _TorchOn(device)


class _NoStream:
    """A CUDA stream/event stand-in for a host without CUDA: every wait and synchronize is a no-op
    (CPU work is already ordered)."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self) -> _NoStream:
        return self

    def synchronize(self) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass


class _CudaStreamsOn(_CudaOn):
    """:class:`_CudaOn` plus streams that do nothing (megatron's dispatcher overlaps its device-to-host
    copies of the split sizes on a side stream)."""

    _stream = _NoStream()

    def Stream(self, *args: Any, **kwargs: Any) -> _NoStream:  # noqa: N802 (torch.cuda's name)
        return self._stream

    def current_stream(self, *args: Any) -> _NoStream:
        return self._stream

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class _TorchStreamsOn(_TorchOn):
    def __init__(self, device: torch.device):
        self.cuda = _CudaStreamsOn(device)


def megatron_moe_on(device: torch.device) -> None:
    """Make megatron-core's MoE layer (router, all-to-all token dispatcher) run on ``device`` (the CPU).

    Upstream assumptions of CUDA, none with an upstream issue found (megatron-core supports CUDA
    only):
    - transformer/moe/token_dispatcher.py (``MoEAlltoAllTokenDispatcher``) creates a ``torch.cuda.Stream``
      and synchronizes on it, and router.py allocates with ``torch.cuda.current_device()``: those modules
      see a proxy of ``torch`` whose streams are no-ops and whose current device is ``device``;
    - ``moe_utils.maybe_move_tensor_to_cpu(t, as_numpy=True)`` returns a CPU tensor unchanged instead of
      as numpy, and ``all_to_all_single`` then refuses the tensor split sizes: on the CPU it converts;
    - moe_utils.py reads the module global ``te_general_gemm`` that only a Transformer Engine import
      defines (``NameError`` in ``RouterGatingLinearFunction`` without it): it is set to None, megatron's
      own "not available" value;
    - at expert parallelism > 1 the dispatcher gathers the routing map over the tensor x expert group
      with tensor_parallel/mappings.py's gather, which allocates on ``torch.cuda.current_device()``:
      :func:`megatron_buffers_on` applies; under tensor x expert parallelism it gathers and
      reduce-scatters tokens with uneven per-rank sizes, which gloo cannot (allgather needs equal sizes,
      no reduce_scatter): on the CPU those two helpers pad and all-gather, or all-reduce and slice;
    - in a process without torch.distributed (a unit test, a conversion tool) tensor_parallel/mappings.py's
      ``get_tensor_model_parallel_group_if_none`` turns the explicit group of one the MoE layer passes
      (``bigtrain.models.moe.process_groups``) into None and then asserts it is not None: there it keeps
      the explicit group.

    A no-op on CUDA (but for te_general_gemm).
    Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0.
    Fails without it: tests/models/test_moe.py::test_megatron_moe_needs_the_patch_on_cpu"""
    from megatron.core import utils
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def group_if_none(group: Any = None, *args: Any, **kwargs: Any) -> Any:
        if group is not None and not torch.distributed.is_initialized():
            return group
        return utils.get_tensor_model_parallel_group_if_none(group, *args, **kwargs)

    mappings.get_tensor_model_parallel_group_if_none = group_if_none
    if device.type == "cuda":
        return
    token_dispatcher.torch = _TorchStreamsOn(device)
    router.torch = _TorchStreamsOn(device)
    # the dispatcher gathers routing maps over the tensor x expert group with megatron's sequence-parallel
    # helpers (tensor_parallel/mappings.py), which allocate on torch.cuda.current_device()
    megatron_buffers_on(device)
    _uneven_first_dim_collectives(mappings)
    original = getattr(moe_utils.maybe_move_tensor_to_cpu, "__wrapped__", moe_utils.maybe_move_tensor_to_cpu)

    @functools.wraps(original)
    def to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy, record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _uneven_first_dim_collectives(mappings: Any) -> None:
    """megatron's gather / reduce-scatter along dim 0 with per-rank sizes (``output_split_sizes``,
    ``input_split_sizes``), which gloo cannot do (its allgather needs equal sizes, it has no
    reduce_scatter): padded to the largest size and all-gathered; all-reduced and sliced."""
    gather = getattr(mappings._gather_along_first_dim, "__wrapped__", mappings._gather_along_first_dim)
    scatter = getattr(
        mappings._reduce_scatter_along_first_dim, "__wrapped__", mappings._reduce_scatter_along_first_dim
    )

    @functools.wraps(gather)
    def gather_uneven(
        input_: Any, group: Any, output_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> Any:
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        most = max(output_split_sizes)
        padded = input_.new_zeros((most, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        chunks = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(chunks, padded, group=group)
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, output_split_sizes)])

    @functools.wraps(scatter)
    def scatter_uneven(
        input_: Any, group: Any, input_split_sizes: Any = None, use_global_buffer: bool = False
    ) -> Any:
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start : start + input_split_sizes[group.rank()]].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = scatter_uneven
