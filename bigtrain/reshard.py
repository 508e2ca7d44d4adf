"""Optimizer state of a checkpoint, by layout key: the source half of resharding (issue 17).

Decision (docs/design/reshard.md §2): a checkpoint is resumed at another layout by *injecting* the state
into the new layout's live engine (route b), never by writing DeepSpeed files of a foreign layout
(route a) nor through DeepSpeed's universal checkpoints (§3). Reasons: the target's flat order, padding
and partitioning are whatever DeepSpeed builds, reached only through its public ``deepspeed.utils.safe_*``
state API, so a DeepSpeed change there is absorbed; tensor slicing goes through the same
``layout.shard`` as weights-only loads (one shard rule); no foreign-layout file is ever written into a
run directory; and universal checkpoints miss ZeRO-0, pipeline renames and vocab re-padding, and merge
unmatched names silently wrongly.

This module is §1 of the note: :func:`read_optimizer_state` parses DeepSpeed's files of any saved layout
(tensor x pipeline x data parallel, ZeRO 0-3, fp32/fp16 and bf16's BF16_Optimizer) with torch alone,
and returns full (tensor-parallel merged, the saved layout's vocab padding) fp32 masters and Adam
moments keyed by layout key, plus the layout-free state. A coverage check makes a silently missed
parameter impossible: every trainable layout key of the saved model is extracted exactly once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain.checkpoint_files import META
from bigtrain.config import Config, ModelConfig
from bigtrain.models import layout

STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class OptimizerState:
    """What :func:`read_optimizer_state` returns. Tensors are full (unsharded) fp32, shaped as
    ``layout.full_shape`` at the *saved* layout's padded vocabulary (``padded_vocab_size``)."""

    config: Config  # the saved run's config (with its derived values)
    layout: dict[str, int]  # saved tensor / pipeline / data_parallel sizes
    zero_stage: int  # the stage DeepSpeed ran (mixed precision at zero.stage 0 runs as 1)
    optimizer: str  # "torch" (ZeRO-0), "zero" (ZeRO-1/2), "bf16" (BF16_Optimizer), "zero3"
    padded_vocab_size: int
    step: int  # Adam's step count (equal for every parameter; checked)
    master: dict[str, torch.Tensor]  # layout key -> fp32 master
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    frozen: list[str]  # layout keys the optimizer does not hold (weights only: ``weights/``)
    global_steps: int
    global_samples: int
    skipped_steps: int
    lr_scheduler: dict[str, Any] | None  # LambdaLR.state_dict()
    loss_scaler: Any | None  # DeepSpeed's LossScaler (fp16 at ZeRO >= 1), else None
    client_state: dict[str, Any] = field(default_factory=dict)  # bigtrain's (step, consumed_samples, ...)

    def keys(self) -> list[str]:
        """Trainable layout keys held (table order)."""
        return list(self.master)

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """Full fp32 ``master``, ``exp_avg`` and ``exp_avg_sq`` of one layout key (saved padded vocab)."""
        return {"master": self.master[key], "exp_avg": self.exp_avg[key], "exp_avg_sq": self.exp_avg_sq[key]}


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing (checkpoint incomplete, or not the layout bigtrain.json names)"
        )
    # DeepSpeed pickles its own objects (LossScaler, enums, fragment addresses): not weights_only.
    # mmap: tensors are read when used, so a large checkpoint is not loaded into memory at once.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _key_of(name: str, m: ModelConfig, expected: dict[str, layout.LayerParam]) -> str | None:
    """The layout key of a DeepSpeed parameter name (``LlamaModel``/``BertModel`` role names, or a
    ``PipelineModule``'s numbered layers and tied module), or None if it names no table parameter."""
    head, _, rest = name.partition(".")
    candidates: list[str] = []
    if head.isdigit():
        candidates = [name]
    elif head == "embedding":
        candidates = [f"0.{rest}"]
    elif head == "blocks":
        index, _, sub = rest.partition(".")
        candidates = [f"{int(index) + 1}.{sub}"] if index.isdigit() else []
    elif head == "final_norm":
        candidates = [f"{m.num_layers + 1}.{rest}"]
    elif head == "output":
        candidates = [f"{m.num_layers + 2}.{rest}"]
    elif name.startswith("tied_modules.embed."):  # the embedding, or (bert, last stage) the tied head
        sub = name[len("tied_modules.embed.") :]
        candidates = [f"0.{sub}", f"{m.num_layers + 2}.{sub}"]
    for key in candidates:
        if key in expected:
            return key
    return None


def _trainable(cfg: Config, params: dict[str, layout.LayerParam]) -> list[str]:
    """Keys the task trains, by the task's own freezing rule (run on shape-less stand-ins)."""
    from bigtrain.finetune import model as finetune_model
    from bigtrain.registry import train_spec

    if not train_spec(cfg).finalize:
        return list(params)
    stand_ins = {key: (lp, nn.Parameter(torch.empty(0))) for key, lp in params.items()}
    finetune_model.freeze(nn.Module(), cfg, stand_ins)
    return [key for key, (_, p) in stand_ins.items() if p.requires_grad]


class _Shards:
    """Per layout key, per tensor rank: the TP-local master and moments, each key exactly once."""

    def __init__(self, ckpt: Path, tp: int):
        self.ckpt, self.tp = ckpt, tp
        self.values: dict[str, list[dict[str, torch.Tensor] | None]] = {}
        self.steps: set[float] = set()

    def put(self, key: str, tp_rank: int, values: dict[str, torch.Tensor], where: str) -> None:
        slots = self.values.setdefault(key, [None] * self.tp)
        if slots[tp_rank] is not None:
            raise ValueError(f"{self.ckpt}: {key} appears twice for tensor rank {tp_rank} ({where})")
        # a copy: the sources may be views of memory-mapped checkpoint files
        slots[tp_rank] = {name: t.detach().to(torch.float32, copy=True) for name, t in values.items()}

    def same(self, key: str, tp_rank: int, values: dict[str, torch.Tensor], where: str) -> None:
        """A second copy (tied embedding) must equal the one kept, bitwise: taken once, checked."""
        kept = self.values[key][tp_rank]
        if kept is None or any(not torch.equal(kept[k], v.float()) for k, v in values.items()):
            raise ValueError(f"{self.ckpt}: the copies of {key} differ between pipeline stages ({where})")

    def step(self, value: Any, where: str) -> None:
        self.steps.add(float(value))
        if len(self.steps) > 1:
            raise ValueError(f"{self.ckpt}: Adam step counts differ ({sorted(self.steps)}; {where})")


def _group_names(model_states: dict[str, Any], path: Path) -> list[list[tuple[str, torch.Size]]]:
    shapes = model_states.get("param_shapes")
    if not shapes:
        raise ValueError(f"{path}: no param_shapes (not a ZeRO checkpoint DeepSpeed 0.19 wrote?)")
    return [list(group.items()) for group in shapes]


def _split_flat(
    flat: dict[str, torch.Tensor], names: list[tuple[str, torch.Size]], pads: list[int], where: str
) -> dict[str, dict[str, torch.Tensor]]:
    """One ZeRO-1/2 flat group (all DP ranks' lean partitions concatenated) cut into parameters."""
    out, off = {}, 0
    total = flat["master"].numel()
    for (name, shape), pad in zip(names, pads, strict=True):
        n = math.prod(shape)
        if off + n > total:
            raise ValueError(f"{where}: flat group holds {total} elements, {name} needs {off + n}")
        out[name] = {k: v[off : off + n].view(shape) for k, v in flat.items()}
        off += n + pad
    if off != total:
        raise ValueError(f"{where}: flat group holds {total} elements, its parameters {off}")
    return out


def _zero12(ckpt: Path, mp: int, dp: int, bf16: bool, shards: _Shards) -> dict[str, dict[str, torch.Tensor]]:
    """ZeRO-1/2 (and bf16's BF16_Optimizer) of one model-parallel rank: name -> values."""
    model_path = ckpt / f"mp_rank_{mp:02d}_model_states.pt"
    groups = _group_names(_load(model_path), model_path)
    prefix = "bf16_" if bf16 else ""
    parts: list[list[dict[str, torch.Tensor]]] = [[] for _ in groups]
    align: list[list[int]] = [[0] * len(g) for g in groups]
    for d in range(dp):
        path = ckpt / f"{prefix}zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt"
        osd = _load(path)["optimizer_state_dict"]
        masters = osd["single_partition_of_fp32_groups"]
        if len(masters) != len(groups):
            raise ValueError(f"{path}: {len(masters)} parameter groups, param_shapes has {len(groups)}")
        base = osd["base_optimizer_state"]
        for g, master in enumerate(masters):
            # rigid (default): the torch state over the padded partition; elastic: a list, stripped
            state = base[g] if isinstance(base, list) else base["state"][g]
            shards.step(state["step"], str(path))
            lean = master.numel()
            if bf16:  # saved with this rank's group padding (non-zero on the last rank only)
                lean -= osd["group_paddings"][g]
            parts[g].append({"master": master[:lean], **{s: state[s][:lean] for s in STATES}})
            if d == 0 and "param_alignment_paddings" in osd:  # per parameter, after it (same on every rank)
                align[g] = [int(pad) for pad in osd["param_alignment_paddings"][g]]
                if len(align[g]) != len(groups[g]):
                    raise ValueError(
                        f"{path}: group {g} has {len(align[g])} alignment paddings for {len(groups[g])} parameters"
                    )
    out: dict[str, dict[str, torch.Tensor]] = {}
    for g, names in enumerate(groups):
        flat = {k: torch.cat([p[k] for p in parts[g]]) for k in ("master", *STATES)}
        out.update(_split_flat(flat, names, align[g], f"{ckpt} mp_rank {mp} group {g}"))
    return out


def _zero3(ckpt: Path, mp: int, dp: int, shards: _Shards) -> dict[str, dict[str, torch.Tensor]]:
    """ZeRO-3 of one model-parallel rank: every parameter is partitioned by itself, ceil(numel/dp)
    elements per rank (the last padded); a rank's flat sub-groups are its pieces in param_shapes order."""
    model_path = ckpt / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
    names = [item for group in _group_names(_load(model_path), model_path) for item in group]
    streams: list[dict[str, torch.Tensor]] = []
    for d in range(dp):
        path = ckpt / f"zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt"
        osd = _load(path)["optimizer_state_dict"]
        flat_groups, state = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"]
        for g in range(len(flat_groups)):
            shards.step(state[g]["step"], str(path))
        streams.append(
            {
                "master": torch.cat([f.flatten() for f in flat_groups]),
                **{s: torch.cat([state[g][s].flatten() for g in range(len(flat_groups))]) for s in STATES},
            }
        )
    out, off = {}, 0
    for name, shape in names:
        n = math.prod(shape)
        part = math.ceil(n / dp)
        out[name] = {
            k: torch.cat([stream[k][off : off + part] for stream in streams])[:n].view(shape)
            for k in ("master", *STATES)
        }
        off += part
    for d, stream in enumerate(streams):
        if stream["master"].numel() != off:
            raise ValueError(
                f"{ckpt}: ZeRO-3 rank {d} mp_rank {mp} holds {stream['master'].numel()} elements, "
                f"its parameters' partitions {off}"
            )
    return out


def _zero0(
    ckpt: Path,
    cfg: Config,
    mp: int,
    tp_rank: int,
    stage: int,
    expected: dict[str, layout.LayerParam],
    trainable: set[str],
    shards: _Shards,
) -> dict[str, dict[str, torch.Tensor]]:
    """ZeRO-0 fp32: torch's unnamed optimizer state, its ids named by rebuilding bigtrain's param groups
    (``engine.param_groups``) over the saved module's parameters in module order."""
    from bigtrain.engine import param_groups

    path = ckpt / f"mp_rank_{mp:02d}_model_states.pt"
    states = _load(path)
    osd = states.get("optimizer")
    if osd is None:
        raise ValueError(f"{path}: no optimizer state (saved without it?)")
    if cfg.optim.layer_decay != 1.0:
        raise ValueError(
            f"{path}: optim.layer_decay={cfg.optim.layer_decay} at zero.stage 0: the optimizer's layer-decay "
            "groups are saved without parameter names and cannot be rebuilt here; not supported"
        )
    m = cfg.model
    if states.get("module") is not None:
        module: dict[str, torch.Tensor] = states["module"]
    else:
        module = _pipeline_module(ckpt, cfg, tp_rank, stage, path)
    named = [(name, t) for name, t in module.items() if _key_of(name, m, expected) is not None]
    unknown = [
        n for n, t in module.items() if _key_of(n, m, expected) is None and not n.endswith("_extra_state")
    ]
    if unknown:
        raise ValueError(f"{path}: module entries that name no table parameter: {unknown}")
    holder = nn.ParameterList()
    by_id: dict[int, str] = {}
    for name, tensor in named:
        p = nn.Parameter(
            torch.empty(tensor.shape, device="meta"), requires_grad=_key_of(name, m, expected) in trainable
        )
        holder.append(p)
        by_id[id(p)] = name
    rebuilt = param_groups(holder, cfg.optim.weight_decay)
    saved_groups = osd["param_groups"]
    if [len(g["params"]) for g in rebuilt] != [len(g["params"]) for g in saved_groups]:
        raise ValueError(
            f"{path}: optimizer groups hold {[len(g['params']) for g in saved_groups]} parameters, bigtrain's "
            f"param_groups over the saved module {[len(g['params']) for g in rebuilt]}: cannot name them"
        )
    out = {}
    for mine, theirs in zip(rebuilt, saved_groups, strict=True):
        for p, i in zip(mine["params"], theirs["params"], strict=True):
            name = by_id[id(p)]
            if i not in osd["state"]:
                raise ValueError(f"{path}: no optimizer state for {name} (id {i}): never stepped?")
            state = osd["state"][i]
            for s in STATES:
                if state[s].shape != p.shape:
                    raise ValueError(
                        f"{path}: id {i} {s} {tuple(state[s].shape)} is not {name}'s {tuple(p.shape)}"
                    )
            shards.step(state["step"], str(path))
            out[name] = {"master": module[name], **{s: state[s] for s in STATES}}
    return out


def _pipeline_module(
    ckpt: Path, cfg: Config, tp_rank: int, stage: int, path: Path
) -> dict[str, torch.Tensor]:
    """A pipeline stage's weights in its ``PipelineModule``'s parameter order, from the per-layer files
    (``layer_{idx}-model_{tp}``, written by data-parallel rank 0; the stage's layers per
    ``layout.pipeline_parts``). A tied embedding is the ``tied_modules`` entry, registered before the
    numbered layers; the last stage's copy has no file of its own (DeepSpeed saves the tied head as a
    function), so its values are layer 0's."""
    m = cfg.model
    p = cfg.parallel
    parts = layout.pipeline_parts(m, cfg.derived.padded_vocab_size, p.tensor, p.pipeline, p.partition_method)
    indices = range(parts[stage], parts[stage + 1])
    head = layout.num_list_layers(m) - 1
    module: dict[str, torch.Tensor] = {}
    tied = m.tie_embeddings and (0 in indices or head in indices)
    if tied:
        if m.family != "llama":
            raise ValueError(
                f"{path}: model.family={m.family} with tied embeddings in a pipeline at zero.stage 0: the tied "
                "head's parameters cannot be named from DeepSpeed's layer files; not supported"
            )
        embedding = _load(ckpt / f"layer_00-model_{tp_rank:02d}-model_states.pt")
        for lp in layout.tied_params(m):
            module[f"tied_modules.embed.{lp.spec.name}"] = embedding[lp.spec.name]
    for index in indices:
        if tied and index in (0, head):
            continue
        for name, value in _load(ckpt / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt").items():
            module[f"{index}.{name}"] = value
    return module


def read_optimizer_state(checkpoint_dir: str | Path) -> OptimizerState:
    """Full fp32 masters and Adam moments of a bigtrain checkpoint (``RUN_DIR/checkpoints/step_X``) by
    layout key, whatever layout and ZeRO stage saved it; no process group needed.

    Returns an :class:`OptimizerState`: ``master``/``exp_avg``/``exp_avg_sq`` hold every trainable key
    once, full shape at the saved padded vocabulary. Raises FileNotFoundError for a missing file, and
    ValueError naming the file for what cannot be read or named: a layout key extracted twice or not at
    all (the coverage check), step counts that differ, a flat group whose size does not add up, or an
    unsupported combination (ZeRO-0 with layer decay, a bert pipeline at ZeRO-0, optimizers
    without Adam moments)."""
    from bigtrain.registry import task_params
    from bigtrain.resume_rules import saved_config

    ckpt = Path(checkpoint_dir)
    meta_path = ckpt / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{ckpt}: no {META} (not a bigtrain checkpoint step directory)")
    meta = json.loads(meta_path.read_text())
    cfg = saved_config(meta)
    if cfg.optim.name not in ("adamw", "adam"):
        raise ValueError(f"{ckpt}: optim.name={cfg.optim.name}: only Adam's moments are extracted")
    tp, pp, dp = (int(meta["layout"][k]) for k in ("tensor", "pipeline", "data_parallel"))
    m = cfg.model
    padded = cfg.derived.padded_vocab_size
    expected = {lp.key: lp for lp in layout.iter_layer_params(m, task=task_params(cfg))}
    trainable = set(_trainable(cfg, expected))
    stage = cfg.zero.stage if cfg.precision == "fp32" or cfg.zero.stage else 1  # engine.deepspeed_config
    bf16 = any(ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    kind = "bf16" if bf16 else {0: "torch", 1: "zero", 2: "zero", 3: "zero3"}[stage]

    shards = _Shards(ckpt, tp)
    seen: dict[str, int] = {}  # key -> pipeline stage it was taken from (tied embeddings: the first)
    for p in range(pp):
        for t in range(tp):
            mp = p * tp + t if pp > 1 else t  # DeepSpeed's checkpoint mp_rank (a pipeline: the grid's)
            if kind == "torch":
                by_name = _zero0(ckpt, cfg, mp, t, p, expected, trainable, shards)
            elif kind == "zero3":
                by_name = _zero3(ckpt, mp, dp, shards)
            else:
                by_name = _zero12(ckpt, mp, dp, bf16, shards)
            for name, values in by_name.items():
                key = _key_of(name, m, expected)
                if key is None:
                    raise ValueError(f"{ckpt}: mp_rank {mp}: parameter {name} names no layout key")
                if seen.setdefault(key, p) != p:  # a tied embedding's second copy (the last stage's):
                    shards.same(key, t, values, f"mp_rank {mp} {name}")  # DeepSpeed keeps both equal
                    continue
                shards.put(key, t, values, f"mp_rank {mp} {name}")

    missing = sorted(trainable - shards.values.keys())
    extra = sorted(shards.values.keys() - trainable)
    incomplete = sorted(k for k, v in shards.values.items() if any(s is None for s in v))
    if missing or extra or incomplete:
        raise ValueError(
            f"{ckpt}: optimizer state does not cover the model exactly once: missing {missing}, "
            f"not trainable by the saved config {extra}, some tensor ranks absent {incomplete}"
        )
    full: dict[str, dict[str, torch.Tensor]] = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for key in expected:
        if key not in trainable:
            continue
        lp, ranks = expected[key], [s for s in shards.values[key] if s is not None]
        want = layout.full_shape(lp.spec, m, padded)
        for what, out in full.items():
            merged = layout.merge([r[what] for r in ranks], lp.spec.split, f"{key} ({what})")
            if tuple(merged.shape) != want:
                raise ValueError(
                    f"{ckpt}: {key} {what} merges to {tuple(merged.shape)}, the table says {want}"
                )
            out[key] = merged
    if not shards.steps:
        raise ValueError(f"{ckpt}: no optimizer step count found")

    first = ckpt / (
        "zero_pp_rank_0_mp_rank_00_model_states.pt" if kind == "zero3" else "mp_rank_00_model_states.pt"
    )
    states = _load(first)
    scaler = None
    if cfg.precision == "fp16" and kind != "torch":
        optim0 = _load(ckpt / f"zero_pp_rank_0_mp_rank_{0:02d}_optim_states.pt")["optimizer_state_dict"]
        scaler = optim0.get("loss_scaler")
    return OptimizerState(
        config=cfg,
        layout={"tensor": tp, "pipeline": pp, "data_parallel": dp},
        zero_stage=stage,
        optimizer=kind,
        padded_vocab_size=padded,
        step=int(next(iter(shards.steps))),
        master=full["master"],
        exp_avg=full["exp_avg"],
        exp_avg_sq=full["exp_avg_sq"],
        frozen=[k for k in expected if k not in trainable],
        global_steps=int(states["global_steps"]),
        global_samples=int(states["global_samples"]),
        skipped_steps=int(states["skipped_steps"]),
        lr_scheduler=states.get("lr_scheduler"),
        loss_scaler=scaler,
        client_state=dict(states.get("bigtrain") or {}),
    )
