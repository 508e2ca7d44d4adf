"""Checkpoints: DeepSpeed's files for exact resume, plus bigtrain's own layout-independent weights.

``RUN_DIR/checkpoints/step_00000020/`` holds
- DeepSpeed's model/optimizer/scheduler files (any ZeRO stage, pipeline or not) for exact resume;
- ``weights/tp{T}_pp{P}.safetensors``: each tensor-parallel x pipeline rank's fp32 *master* weights,
  keyed by layout key (``"3.attention.qkv.weight"``), written by data-parallel rank 0; conversion and
  weights-only loads read only these, whatever the ZeRO stage was;
- ``rng/rank{R}.pt``: every rank's RNG states;
- ``bigtrain.json``: the resolved config, training state (step, consumed samples, skipped batches), layout
  and the identity of the data files (``data``: per prefix sizes and metadata digest, compared at resume);
- ``manifest.json``: every file with its size and sha256 (:mod:`bigtrain.checkpoint_files`).

A save writes into ``.tmp_step_X``; every rank fsyncs and checksums the files it wrote, rank 0 writes the
manifest, renames the directory into place and only then replaces the ``latest`` pointer (temp file +
rename). A resume verifies the manifest (ranks share the checksumming) and falls back, loudly, to the
newest checkpoint that verifies; bad ones are moved aside as ``step_X.invalid``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bigtrain import checkpoint_files as files
from bigtrain import compat
from bigtrain.checkpoint_files import LATEST, META, SAVE_FAULT_POINTS, tag_for
from bigtrain.config import Config, ModelConfig, config_from_dict
from bigtrain.data.validate import recorded_data
from bigtrain.distributed import Dist, barrier
from bigtrain.models import layout

if TYPE_CHECKING:
    from bigtrain.resume_rules import OrderChange

__all__ = ["LATEST", "META", "tag_for", "save_checkpoint", "resume", "WeightReader", "load_weights_only"]


def checkpoints_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) / "checkpoints"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names, if that checkpoint has a manifest (no checksums: cheap)."""
    tag = files.latest_pointer(ckpt_dir)
    return tag if tag and (ckpt_dir / tag / files.MANIFEST).is_file() else None


def list_tags(ckpt_dir: Path) -> list[str]:
    """Complete (manifest-bearing) checkpoint tags, oldest first."""
    return sorted(t for t in files.candidate_tags(ckpt_dir) if (ckpt_dir / t / files.MANIFEST).is_file())


# ---------------------------------------------------------------------------- saving
def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fp32_master_weights(engine: Any, cfg: Config) -> dict[str, torch.Tensor]:
    """This rank's (tensor x pipeline) shards as fp32 masters, keyed by layout key; stacked expert
    weights hold all experts (gathered over the expert-parallel group, dim 0), so the files do not
    depend on ``parallel.expert``.

    A collective over the data-parallel group under ZeRO and over the expert-parallel group (every rank
    must call it)."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_full_fp32_param

    from bigtrain.registry import local_parameters

    out = {}
    experts = cfg.parallel.expert
    for key, (lp, param) in local_parameters(engine.module, cfg).items():
        full = safe_get_full_fp32_param(param)  # ZeRO and the bf16 optimizer map parameters to masters
        if full is None and getattr(param, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE:
            # ZeRO-3 keeps no master of a frozen (requires_grad=False) parameter, and its data is this
            # rank's empty partition between forwards: gather the whole tensor (every rank takes part)
            with GatheredParameters([param]):
                full = param.detach().clone()
        if full is None:
            full = param.detach()  # fp32 without ZeRO: the parameter is the master; or a frozen one
        full = full.float().contiguous()
        if experts > 1 and layout.is_expert(lp.spec):
            from megatron.core import parallel_state

            chunks = [torch.empty_like(full) for _ in range(experts)]
            torch.distributed.all_gather(chunks, full, group=parallel_state.get_expert_model_parallel_group())
            full = torch.cat(chunks)  # [experts, ...]: rank r held experts [r*E/ep, (r+1)*E/ep)
        out[key] = full.cpu()
    return out


class _SaveFaults:
    """debug.kill_in_save: SIGKILL this rank at one named moment of one save (tests, cluster drills)."""

    def __init__(self, cfg: Config, dist: Dist, step: int):
        d = cfg.debug
        hit_rank = d.fault_rank in (-1, dist.rank)
        hit_step = d.kill_in_save_step in (0, step)
        self.point = d.kill_in_save if (d.kill_in_save and hit_rank and hit_step) else None

    def __call__(self, point: str) -> None:
        assert point in SAVE_FAULT_POINTS, point
        if point == self.point:
            print(f"debug.kill_in_save: SIGKILL at {point!r}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    engine: Any, cfg: Config, dist: Dist, step: int, state: dict[str, Any], protect: tuple[str, ...] = ()
) -> Path:
    """Save everything needed to resume at ``step``; returns the final directory.

    ``protect``: tags retention must keep (the checkpoint this run resumed from)."""
    ckpt_dir = checkpoints_dir(cfg)
    tag = tag_for(step)
    tmp = ckpt_dir / f"{files.TMP_PREFIX}{tag}"
    fault = _SaveFaults(cfg, dist, step)
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    fault("tmp_created")

    recorder = compat.EngineFileRecorder(engine, lambda n: fault("first_engine_file") if n == 1 else None)
    try:
        client_state = {"bigtrain": {**state, "step": step}}
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
    finally:
        written = recorder.close()
    fault("engine_files")
    weights = fp32_master_weights(engine, cfg)  # collective under ZeRO: every rank
    if dist.writes_weights:
        (tmp / "weights").mkdir(exist_ok=True)
        path = tmp / "weights" / f"tp{dist.tp_rank:02d}_pp{dist.pp_rank:02d}.safetensors"
        save_file(weights, str(path))
        written.append(path)
    fault("weights")
    (tmp / "rng").mkdir(exist_ok=True)
    rng_path = tmp / "rng" / f"rank{dist.rank:05d}.pt"
    torch.save(_rng_state(), rng_path)
    written.append(rng_path)
    if dist.is_main:
        meta = {
            "step": step,
            **state,
            "layout": {
                "tensor": cfg.parallel.tensor,
                "pipeline": cfg.parallel.pipeline,
                "data_parallel": cfg.derived.data_parallel_size,
                "context": cfg.parallel.context,
                "expert": cfg.parallel.expert,
            },
            "config": cfg.to_dict(),
            # the files behind the data position, compared at resume (resume_rules.data_changes)
            "data": recorded_data(cfg.data),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        written.append(tmp / META)
    fault("rng")

    # every rank makes its own files durable and checksums them (in parallel), rank 0 collects
    mine = {p.relative_to(tmp).as_posix(): files.file_entry(p) for p in written}
    gathered: list[dict[str, Any] | None] = [None] * dist.world_size
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    fault("checksums")
    final = ckpt_dir / tag
    if dist.is_main:
        entries = {rel: e for part in gathered for rel, e in (part or {}).items()}
        files.write_manifest(tmp, entries, step)
        fault("manifest")
        # a save of a step already on disk (after a rollback) replaces it so that a crash at any moment
        # leaves the old or the new one complete (the old is restored at start-up, recover_dir)
        files.replace_dir(tmp, final)
        fault("renamed")
        files.set_latest(ckpt_dir, tag)
        fault("latest")
        files.prune(ckpt_dir, cfg.checkpoint.keep_last, protect=(tag, *protect))
        fault("pruned")
    barrier()
    return final


# ---------------------------------------------------------------------------- loading
def _broadcast(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every rank (one view of a shared file system)."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def verify_distributed(ckpt: Path, dist: Dist, checksums: bool = True) -> list[str]:
    """Verify a checkpoint with the checksumming spread over all ranks; every rank gets all problems."""
    try:
        entries = files.read_manifest(ckpt)
        share = {
            rel: e for i, (rel, e) in enumerate(sorted(entries.items())) if i % dist.world_size == dist.rank
        }
        problems = files.check_files(ckpt, share, checksums)
    except ValueError as e:  # still join the gather below: every rank must reach it
        problems = [str(e)]
    if not torch.distributed.is_initialized():
        return problems
    gathered: list[list[str] | None] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, problems)
    return list(dict.fromkeys(p for part in gathered for p in (part or [])))


def choose_resume_tag(cfg: Config, dist: Dist, refuse_none_valid: bool = False) -> str | None:
    """The newest checkpoint in run_dir that verifies. Newer bad ones are reported and moved aside.

    ``refuse_none_valid``: raise ConfigError, instead of returning None, when checkpoints existed but
    none verifies (a relaunch must not silently start the run over from step 0)."""
    from bigtrain.config import ConfigError
    from bigtrain.metrics import console

    ckpt_dir = checkpoints_dir(cfg)
    if dist.is_main:
        removed = files.remove_stale_temporaries(ckpt_dir)
        if removed:
            console(f"removed leftovers of interrupted saves: {', '.join(removed)}")
    tags = _broadcast(files.candidate_tags(ckpt_dir))
    for i, tag in enumerate(tags):
        problems = verify_distributed(ckpt_dir / tag, dist, cfg.checkpoint.verify_checksums)
        if not problems:
            if dist.is_main and files.latest_pointer(ckpt_dir) != tag:
                files.set_latest(ckpt_dir, tag)
            barrier()
            return tag
        barrier()
        if dist.is_main:
            moved = files.invalidate(ckpt_dir, tag)
            then = "falling back to the previous checkpoint" if i + 1 < len(tags) else "no earlier checkpoint"
            files.warn(
                f"checkpoint {ckpt_dir / tag} is invalid and will not be loaded ({'; '.join(problems)}); "
                f"moved to {moved.name}, {then}"
            )
        barrier()
    if tags and refuse_none_valid:
        raise ConfigError(
            f"{ckpt_dir}: no valid checkpoint left (moved aside: "
            f"{', '.join(t + files.INVALID_SUFFIX for t in tags)}); not starting the run over from step 0 in "
            "a run directory that had checkpoints: repair or restore them, or move checkpoints/ away to start afresh"
        )
    return None


def compare_with_saved(cfg: Config, tag: str, order_change: OrderChange | None = None) -> list[str]:
    """:func:`bigtrain.resume_rules.reconcile` against checkpoint ``tag`` of run_dir: raises ConfigError
    for a refused change, returns the honoured ones as lines. ``order_change``: how the data orders of
    two training sample counts are compared (default: built in this process)."""
    from bigtrain.resume_rules import built_order_change, reconcile

    ckpt = checkpoints_dir(cfg) / tag
    return reconcile(
        cfg, json.loads((ckpt / META).read_text()), str(ckpt), order_change or built_order_change
    )


# Optimizer hyper-parameters the config sets (engine.build_optimizer) and a checkpoint load overwrites with
# the saved ones; "lr" is the schedule's (see _keep_configured).
_GROUP_HYPERPARAMETERS = ("betas", "eps", "weight_decay", "momentum", "alpha")


def _keep_configured(engine: Any, cfg: Config, saved: Config) -> Callable[[], None]:
    """Snapshot what the engine was built with from ``cfg`` before DeepSpeed's load overwrites it with the
    checkpoint's values; the returned function puts it back. That covers the optimizer's param_groups
    hyper-parameters, the LR schedule (LambdaLR pickles its LRSchedule and base_lrs; the restored step
    count is kept), ZeRO/bf16's gradient clip and fp16's dynamic loss-scaler settings (the saved current
    scale is kept unless ``fp16.initial_scale_power`` changed)."""
    from bigtrain.engine import LRSchedule

    scheduler, opt = engine.lr_scheduler, engine.optimizer
    groups = [{k: g[k] for k in _GROUP_HYPERPARAMETERS if k in g} for g in scheduler.optimizer.param_groups]
    settings = compat.optimizer_settings(opt)

    def restore() -> None:
        schedule = LRSchedule(cfg)
        params = scheduler.optimizer.param_groups
        scheduler.lr_lambdas = [schedule] * len(params)
        scheduler.base_lrs = [cfg.optim.lr * g.get("lr_scale", 1.0) for g in params]
        for g, configured, base in zip(params, groups, scheduler.base_lrs):
            g.update(configured, initial_lr=base, lr=base * schedule(scheduler.last_epoch))
        compat.set_scheduler_last_lr(scheduler)
        changed = cfg.fp16.initial_scale_power != saved.fp16.initial_scale_power
        compat.restore_optimizer_settings(
            opt, settings, float(2**cfg.fp16.initial_scale_power) if changed else None
        )

    return restore


def resume(engine: Any, cfg: Config, dist: Dist, tag: str) -> dict[str, Any]:
    """Load checkpoint ``tag`` of run_dir (model, optimizer, LR schedule, loss scale, RNG); returns the
    saved training state. Hyper-parameters that ``bigtrain.resume_rules`` honours (schedule, optimizer
    param_groups, clipping, fp16 scaling) are those of ``cfg`` afterwards, not the checkpoint's.

    A checkpoint saved at another layout (``reshard_inject.needs_reshard``) has its optimizer state
    injected (:func:`bigtrain.reshard_inject.inject`); the engine's weights must then already be the
    checkpoint's (``load_weights_only`` before ``deepspeed.initialize``, as ``pretrain.run`` does)."""
    from bigtrain import reshard_inject
    from bigtrain.resume_rules import saved_config

    ckpt_dir = checkpoints_dir(cfg)
    meta = json.loads((ckpt_dir / tag / META).read_text())
    saved = saved_config(meta)
    restore_configured = _keep_configured(engine, cfg, saved)
    resharding = reshard_inject.needs_reshard(meta, saved, cfg)
    if resharding and max(saved.parallel.expert, cfg.parallel.expert) > 1:
        from bigtrain.config import ConfigError

        raise ConfigError(
            f"{ckpt_dir / tag}: saved at parallel.expert={saved.parallel.expert}; resuming it at another tensor, "
            "pipeline, ZeRO or data-parallel layout needs the expert optimizer state resharded, which is not "
            "implemented: resume at the saved layout, or start a new train.run_dir with checkpoint.load"
        )
    if resharding:
        client_state = {"bigtrain": reshard_inject.inject(engine, cfg, dist, ckpt_dir / tag)}
    else:
        path, client_state = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        if cfg.parallel.expert > 1:
            _load_experts(engine, cfg, ckpt_dir / tag)
    restore_configured()
    # at another layout the ranks play other roles: every rank takes saved rank 0's streams (all ranks
    # are seeded alike; what draws from them, LoRA dropout, cannot repeat at another layout anyway)
    rng_file = ckpt_dir / tag / "rng" / f"rank{0 if resharding else dist.rank:05d}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=False))
    return client_state["bigtrain"]


@torch.no_grad()
def _load_experts(engine: Any, cfg: Config, ckpt: Path) -> None:
    """Put this rank's experts back from the checkpoint's weights files (fp32 masters, all experts).

    DeepSpeed's model file holds data-parallel rank 0's parameters, so under expert parallelism the
    other expert ranks would get rank 0's experts: at ZeRO-0, where the parameters are the masters, the
    EP2 resume test's losses then drift 2.9e-3 from the uninterrupted run's (ZeRO-1/2 restore them from
    the rank's own optimizer shards as well)."""
    from bigtrain.models.parallelize import tensor_parallel
    from bigtrain.registry import local_parameters

    reader = WeightReader(ckpt)
    tp = tensor_parallel(cfg)
    for lp, param in local_parameters(engine.module, cfg).values():
        if layout.is_expert(lp.spec):
            value = layout.shard(reader.full(lp), lp.spec.split, tp.rank, tp.size)
            param.copy_(layout.expert_shard(value, lp.spec, tp.expert.rank, tp.expert.size).to(param.dtype))


def _weight_files(rel: str) -> bool:
    return rel.startswith("weights/") or rel == META


def resolve_weights_dir(path: str | Path) -> Path:
    """A checkpoint tag directory (verified), or the newest valid checkpoint under a checkpoints or run
    directory. Only the files weight readers use are checksummed; a bad one raises ValueError naming it."""
    p = Path(path)
    if (p / "weights").is_dir() or (p / files.MANIFEST).is_file():
        problems = files.verify(p, select=_weight_files)
        if problems:
            raise ValueError(f"checkpoint {p} is invalid: " + "; ".join(problems))
        return p
    if (p / "checkpoints").is_dir():
        return resolve_weights_dir(p / "checkpoints")
    tag = files.newest_valid(p, select=_weight_files)
    if tag is not None:
        return p / tag
    raise FileNotFoundError(f"{p}: not a bigtrain checkpoint (no weights/ and no valid step_* checkpoint)")


class WeightReader:
    """Full (unsharded) tensors by layout key from a checkpoint saved at any layout, one at a time."""

    def __init__(self, path: str | Path):
        self.dir = resolve_weights_dir(path)
        self.meta = json.loads((self.dir / META).read_text())
        self.tensor = self.meta["layout"]["tensor"]
        self.files: dict[tuple[int, int], Path] = {}
        for f in sorted((self.dir / "weights").glob("tp*_pp*.safetensors")):
            tp_name, pp_name = f.stem[2:].split("_pp")
            self.files[(int(tp_name), int(pp_name))] = f
        self.key_to_pp: dict[str, int] = {}
        for (tp, pp), f in self.files.items():
            if tp == 0:
                with safe_open(str(f), "pt") as sf:
                    for key in sf.keys():
                        self.key_to_pp.setdefault(key, pp)
        for tp, pp in {(t, p) for t in range(self.tensor) for p in set(self.key_to_pp.values())}:
            if (tp, pp) not in self.files:
                raise FileNotFoundError(
                    f"{self.dir / 'weights'}: shard tp{tp:02d}_pp{pp:02d}.safetensors is missing"
                )

    def keys(self) -> list[str]:
        return list(self.key_to_pp)

    def full(self, lp: layout.LayerParam) -> torch.Tensor:
        if lp.key not in self.key_to_pp:
            raise KeyError(f"{self.dir}: no tensor {lp.key} (model shape differs from the checkpoint's?)")
        pp = self.key_to_pp[lp.key]
        shards = []
        for tp in range(self.tensor):
            with safe_open(str(self.files[(tp, pp)]), "pt") as sf:
                shards.append(sf.get_tensor(lp.key))
        return layout.merge(shards, lp.spec.split, lp.key)


def model_shape_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """Fields whose difference makes saved weights unusable, as 'field: checkpoint X vs config Y'."""
    fields = {
        "family": lambda m: m.family,
        "num_layers": lambda m: m.num_layers,
        "hidden_size": lambda m: m.hidden_size,
        "num_attention_heads": lambda m: m.num_attention_heads,
        "num_kv_heads": lambda m: m.kv_heads,
        "ffn_hidden_size": lambda m: m.ffn_size,
        "vocab_size": lambda m: m.vocab_size,
        "tie_embeddings": lambda m: m.tie_embeddings,
    }
    if saved.family == current.family == "bert":  # learned positions and token types are weights there
        del fields["num_kv_heads"]
        fields["max_position_embeddings"] = lambda m: m.context_length
        fields["type_vocab_size"] = lambda m: m.type_vocab_size
    return [
        f"model.{name}: checkpoint {get(saved)} vs config {get(current)}"
        for name, get in fields.items()
        if get(saved) != get(current)
    ]


@torch.no_grad()
def load_weights_only(model: torch.nn.Module, cfg: Config, path: str | Path) -> dict[str, Any]:
    """Fill this rank's parameters from a checkpoint of any layout (fresh optimizer, step 0).

    Tensors that fine-tuning adds (LoRA adapters, a classification head) keep their initialization
    when the checkpoint (a pretrained base) does not have them."""
    from bigtrain.models.parallelize import tensor_parallel
    from bigtrain.registry import local_parameters

    reader = WeightReader(path)
    diffs = model_shape_differences(config_from_dict(reader.meta["config"]).model, cfg.model)
    if diffs:
        raise ValueError(f"{reader.dir}: model shape differs from the config: " + "; ".join(diffs))
    tp = tensor_parallel(cfg)
    for key, (lp, param) in local_parameters(model, cfg).items():
        if key not in reader.key_to_pp and layout.is_added(lp.spec):
            continue
        full = reader.full(lp)
        if lp.spec.split == "vocab" and full.shape[0] != cfg.derived.padded_vocab_size:
            resized = full.new_zeros(cfg.derived.padded_vocab_size, *full.shape[1:])  # bert's MLM bias: 1-D
            if cfg.model.vocab_size is None:
                raise ValueError(f"{reader.dir}: model.vocab_size is not set (resolve the config first)")
            n = min(full.shape[0], cfg.model.vocab_size)
            resized[:n] = full[:n]
            full = resized
        value = layout.shard(full, lp.spec.split, tp.rank, tp.size)
        value = layout.expert_shard(value, lp.spec, tp.expert.rank, tp.expert.size)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{reader.dir}: {key} has shape {tuple(full.shape)}, the model needs another")
        param.copy_(value.to(param.dtype))
    return reader.meta
