"""Optimizer state of a checkpoint, by layout key: the source half of resharding (issue 17).

Decision (docs/design/reshard.md §2): a checkpoint is resumed at another layout by *injecting* the state
into the new layout's live engine (route b), never by writing DeepSpeed files of a foreign layout
(route a) nor through DeepSpeed's universal checkpoints (§3). Reasons: the target's flat order, padding
and partitioning are whatever DeepSpeed builds, reached only through its public ``deepspeed.utils.safe_*``
state API, so a DeepSpeed change there is absorbed; tensor slicing goes through the same
``layout.shard`` as weights-only loads (one shard rule); no foreign-layout file is ever written into a
run directory; and universal checkpoints miss ZeRO-0, pipeline renames and vocab re-padding, and merge
unmatched names silently wrongly.

This module is §1 of the note: :func:`open_optimizer_state` parses DeepSpeed's files of any saved layout
(tensor x pipeline x data parallel, ZeRO 0-3, fp32/fp16 and bf16's BF16_Optimizer) with torch alone,
and gives full (tensor-parallel merged, the saved layout's vocab padding) fp32 masters and Adam moments
one layout key at a time, plus the layout-free state. Opening reads metadata only (names, shapes,
partition sizes: unpickled from memory-mapped files, no tensor data) and computes where every
parameter's elements lie in each rank's flat partition; :meth:`OptimizerState.tensors` then copies out
just that parameter's pieces, so memory stays a small multiple of the largest tensor, whatever the
model's size (§4). A coverage check at open makes a silently missed parameter impossible: every
trainable layout key of the saved model is found exactly once.

It also reads the *layout-free* format that ``tools/reshard_checkpoint.py`` writes (``bigtrain.json``
``"optimizer_format": "layout_free"``): ``weights/tp{T}_pp{P}.safetensors`` (fp32 masters, every key),
``optim/tp{T}_pp{P}.safetensors`` (``exp_avg/<key>``, ``exp_avg_sq/<key>``, trainable keys, sharded like
the weights) and ``optim/state.pt`` (:data:`SCALARS`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import nn

from bigtrain.checkpoint_files import META
from bigtrain.config import Config, ModelConfig
from bigtrain.models import layout

STATES = ("exp_avg", "exp_avg_sq")
WHAT = ("master", *STATES)
LAYOUT_FREE = "layout_free"  # bigtrain.json "optimizer_format" of tools/reshard_checkpoint.py's output
OPTIM_STATE = "optim/state.pt"
# what optim/state.pt holds: OptimizerState's fields that are not per-parameter tensors
SCALARS = (
    "step",
    "global_steps",
    "global_samples",
    "skipped_steps",
    "lr_scheduler",
    "loss_scaler",
    "client_state",
    "frozen",
)
Values = dict[str, torch.Tensor]  # "master", "exp_avg", "exp_avg_sq" -> tensor


class _Source(Protocol):
    def keys(self) -> list[str]: ...

    def read(self, key: str, which: tuple[str, ...]) -> Values: ...


@dataclass
class OptimizerState:
    """What :func:`open_optimizer_state` returns: the scalars, read at open, and a per-key reader.
    Tensors are full (unsharded) fp32, shaped as ``layout.full_shape`` at ``padded_vocab_size`` (the
    *saved* layout's padded vocabulary; for the reshard tool's output, the layout it was written for).
    The reader reads the checkpoint directory when asked: it must stay in place while the state is used
    (an in-place reshard of it replaces the files)."""

    config: Config  # the saved run's config (with its derived values)
    layout: dict[str, int]  # saved tensor / pipeline / data_parallel sizes
    zero_stage: int  # the stage DeepSpeed ran (mixed precision at zero.stage 0 runs as 1)
    # "torch" (ZeRO-0), "zero" (ZeRO-1/2), "bf16" (BF16_Optimizer), "zero3", or "layout_free" (the
    # reshard tool's output; zero_stage is then the stage its bigtrain.json names)
    optimizer: str
    padded_vocab_size: int
    step: int  # Adam's step count (equal for every parameter; checked)
    frozen: list[str]  # layout keys the optimizer does not hold (weights only: ``weights/``)
    global_steps: int
    global_samples: int
    skipped_steps: int
    lr_scheduler: dict[str, Any] | None  # LambdaLR.state_dict()
    loss_scaler: Any | None  # DeepSpeed's LossScaler (fp16 at ZeRO >= 1), else None
    client_state: dict[str, Any] = field(default_factory=dict)  # bigtrain's (step, consumed_samples, ...)
    source: _Source | None = field(default=None, repr=False)

    def keys(self) -> list[str]:
        """Trainable layout keys held (table order)."""
        assert self.source is not None
        return self.source.keys()

    def tensors(self, key: str, which: tuple[str, ...] = WHAT) -> dict[str, torch.Tensor]:
        """Full fp32 ``master``, ``exp_avg`` and ``exp_avg_sq`` of one layout key (saved padded vocab),
        read from the checkpoint now (fresh tensors, not views of its files); ``which`` picks some of
        them (one at a time keeps one full tensor in memory). KeyError for a key not held or an unknown
        name; ValueError naming the file when the pieces do not merge (replicated shards or tied copies
        that differ, a shape the table does not give)."""
        assert self.source is not None
        if key not in self.keys():
            raise KeyError(
                f"{key}: not a trainable parameter of this checkpoint (frozen: {key in self.frozen})"
            )
        unknown = [w for w in which if w not in WHAT]
        if unknown:
            raise KeyError(f"{unknown}: not one of {WHAT}")
        return self.source.read(key, tuple(which))

    def _all(self, what: str) -> dict[str, torch.Tensor]:
        return {key: self.tensors(key, (what,))[what] for key in self.keys()}

    # Every key at once (tests, small models): from read_optimizer_state these are in memory already.
    @property
    def master(self) -> dict[str, torch.Tensor]:
        return self._all("master")

    @property
    def exp_avg(self) -> dict[str, torch.Tensor]:
        return self._all("exp_avg")

    @property
    def exp_avg_sq(self) -> dict[str, torch.Tensor]:
        return self._all("exp_avg_sq")


def _load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing (checkpoint incomplete, or not the layout bigtrain.json names)"
        )
    # DeepSpeed pickles its own objects (LossScaler, enums, fragment addresses): not weights_only.
    # mmap: tensors are read when used, so a large checkpoint is not loaded into memory at once.
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # a truncated or corrupt zip/pickle
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


class _Files:
    """Memory-mapped files loaded for one read and dropped after it: a file's touched pages stay
    resident only while it is mapped, so holding every file of a large checkpoint open would let the
    process's memory grow with the model."""

    def __init__(self) -> None:
        self.loaded: dict[Path, Any] = {}

    def __call__(self, path: Path) -> Any:
        if path not in self.loaded:
            self.loaded[path] = _load(path)
        return self.loaded[path]

    def close(self) -> None:
        self.loaded.clear()  # the last references: the mappings go (checked: none left in /proc/self/maps)


# one tensor rank's values of one key, for the names asked: fresh tensors (never views of the files)
Read = Callable[[_Files, tuple[str, ...]], Values]


@dataclass(frozen=True)
class _Pieces:
    """A parameter stored as 1-D pieces of flat buffers: ``(file, group, start, stop)`` in order;
    ``vectors(loaded file, group)`` gives that group's flat master and moments."""

    shape: torch.Size
    pieces: tuple[tuple[Path, int, int, int], ...]
    vectors: Callable[[Any, int], Values]

    def __call__(self, files: _Files, which: tuple[str, ...]) -> Values:
        out = {}
        for what in which:
            # detached: DeepSpeed saves partitions that require grad, and a graph back to them would
            # keep the file mapped as long as the result lives
            parts = [self.vectors(files(path), g)[what].detach()[a:b] for path, g, a, b in self.pieces]
            out[what] = (parts[0].clone() if len(parts) == 1 else torch.cat(parts)).view(self.shape)
        return out


@dataclass(frozen=True)
class _Entries:
    """A parameter stored whole: per what, ``(file, keys)`` the tensor is found at by indexing."""

    at: dict[str, tuple[Path, tuple[Any, ...]]]

    def __call__(self, files: _Files, which: tuple[str, ...]) -> Values:
        out = {}
        for what in which:
            path, keys = self.at[what]
            value = files(path)
            for k in keys:
                value = value[k]
            out[what] = value.detach().clone()
        return out


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


def trainable_keys(cfg: Config, params: dict[str, layout.LayerParam]) -> list[str]:
    """Keys the task trains, by the task's own freezing rule (run on shape-less stand-ins)."""
    from bigtrain.finetune import model as finetune_model
    from bigtrain.registry import train_spec

    if not train_spec(cfg).finalize:
        return list(params)
    stand_ins = {key: (lp, nn.Parameter(torch.empty(0))) for key, lp in params.items()}
    finetune_model.freeze(nn.Module(), cfg, stand_ins)
    return [key for key, (_, p) in stand_ins.items() if p.requires_grad]


class _Steps:
    """Adam's step counts seen while indexing: all must agree."""

    def __init__(self, ckpt: Path):
        self.ckpt, self.seen = ckpt, set[float]()

    def add(self, value: Any, where: str) -> None:
        self.seen.add(float(value))
        if len(self.seen) > 1:
            raise ValueError(f"{self.ckpt}: Adam step counts differ ({sorted(self.seen)}; {where})")


def _group_names(model_states: dict[str, Any], path: Path) -> list[list[tuple[str, torch.Size]]]:
    shapes = model_states.get("param_shapes")
    if not shapes:
        raise ValueError(f"{path}: no param_shapes (not a ZeRO checkpoint DeepSpeed 0.19 wrote?)")
    return [[(name, torch.Size(shape)) for name, shape in group.items()] for group in shapes]


def _cut(
    extents: list[tuple[Path, int, int]], start: int, stop: int
) -> tuple[tuple[Path, int, int, int], ...]:
    """Elements ``start:stop`` of a stream made of ``extents`` = (file, group, length), in order, as
    (file, group, start, stop) pieces within each extent."""
    pieces, base = [], 0
    for path, g, length in extents:
        a, b = max(start, base), min(stop, base + length)
        if a < b:
            pieces.append((path, g, a - base, b - base))
        base += length
    return tuple(pieces)


def _zero12_vectors(obj: Any, g: int) -> Values:
    osd = obj["optimizer_state_dict"]
    base = osd["base_optimizer_state"]
    # rigid (default): the torch state over the padded partition; elastic: a list, stripped
    state = base[g] if isinstance(base, list) else base["state"][g]
    return {"master": osd["single_partition_of_fp32_groups"][g], **{s: state[s] for s in STATES}}


def _zero12(ckpt: Path, mp: int, dp: int, bf16: bool, steps: _Steps) -> dict[str, Read]:
    """ZeRO-1/2 (and bf16's BF16_Optimizer) of one model-parallel rank: name -> where its elements are.
    A group's flat buffer is the DP ranks' lean partitions one after another; a parameter lies at its
    offset in it (each followed by its alignment padding), possibly across two or more ranks' files."""
    model_path = ckpt / f"mp_rank_{mp:02d}_model_states.pt"
    groups = _group_names(_load(model_path), model_path)
    prefix = "bf16_" if bf16 else ""
    extents: list[list[tuple[Path, int, int]]] = [[] for _ in groups]
    align: list[list[int]] = [[0] * len(g) for g in groups]
    for d in range(dp):
        path = ckpt / f"{prefix}zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt"
        osd = _load(path)["optimizer_state_dict"]
        masters = osd["single_partition_of_fp32_groups"]
        if len(masters) != len(groups):
            raise ValueError(f"{path}: {len(masters)} parameter groups, param_shapes has {len(groups)}")
        for g, master in enumerate(masters):
            vectors = _zero12_vectors({"optimizer_state_dict": osd}, g)
            steps.add(_state_step(osd, g), str(path))
            lean = master.numel()
            if bf16:  # saved with this rank's group padding (non-zero on the last rank only)
                lean -= osd["group_paddings"][g]
            short = [s for s in STATES if vectors[s].numel() < lean]
            if short:
                raise ValueError(f"{path}: group {g} {short} hold fewer than the {lean} master elements")
            extents[g].append((path, g, lean))
            if d == 0 and "param_alignment_paddings" in osd:  # per parameter, after it (same on every rank)
                align[g] = [int(pad) for pad in osd["param_alignment_paddings"][g]]
                if len(align[g]) != len(groups[g]):
                    raise ValueError(
                        f"{path}: group {g} has {len(align[g])} alignment paddings for {len(groups[g])} parameters"
                    )
        del osd, masters
    out: dict[str, Read] = {}
    for g, names in enumerate(groups):
        total, off = sum(length for _, _, length in extents[g]), 0
        where = f"{ckpt} mp_rank {mp} group {g}"
        for (name, shape), pad in zip(names, align[g], strict=True):
            n = shape.numel()
            if off + n > total:
                raise ValueError(f"{where}: flat group holds {total} elements, {name} needs {off + n}")
            out[name] = _Pieces(shape, _cut(extents[g], off, off + n), _zero12_vectors)
            off += n + pad
        if off != total:
            raise ValueError(f"{where}: flat group holds {total} elements, its parameters {off}")
    return out


def _state_step(osd: dict[str, Any], g: int) -> Any:
    base = osd["base_optimizer_state"]
    return (base[g] if isinstance(base, list) else base["state"][g])["step"]


def _zero3_vectors(obj: Any, g: int) -> Values:
    osd = obj["optimizer_state_dict"]
    state = osd["optimizer_state_dict"]["state"][g]
    return {"master": osd["fp32_flat_groups"][g].flatten(), **{s: state[s].flatten() for s in STATES}}


def _zero3(ckpt: Path, mp: int, dp: int, steps: _Steps) -> dict[str, Read]:
    """ZeRO-3 of one model-parallel rank: every parameter is partitioned by itself, ceil(numel/dp)
    elements per rank (the last padded); a rank's flat sub-groups are its pieces in param_shapes order,
    so a parameter is the same offset range of every rank's stream of sub-groups."""
    model_path = ckpt / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
    names = [item for group in _group_names(_load(model_path), model_path) for item in group]
    streams: list[list[tuple[Path, int, int]]] = []
    for d in range(dp):
        path = ckpt / f"zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt"
        osd = _load(path)["optimizer_state_dict"]
        flat_groups, state = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"]
        for g, flat in enumerate(flat_groups):
            steps.add(state[g]["step"], str(path))
            if any(state[g][s].numel() != flat.numel() for s in STATES):
                raise ValueError(f"{path}: sub-group {g}'s moments and master differ in size")
        streams.append([(path, g, flat.numel()) for g, flat in enumerate(flat_groups)])
        del osd, flat_groups, state
    out: dict[str, Read] = {}
    off = 0
    for name, shape in names:
        n = shape.numel()
        part = math.ceil(n / dp)
        pieces: list[tuple[Path, int, int, int]] = []
        for d, stream in enumerate(streams):  # the last ranks' pieces end in padding: cut at n
            take = min(part, n - d * part)
            if take > 0:
                pieces.extend(_cut(stream, off, off + take))
        out[name] = _Pieces(shape, tuple(pieces), _zero3_vectors)
        off += part
    for d, stream in enumerate(streams):
        held = sum(length for _, _, length in stream)
        if held != off:
            raise ValueError(
                f"{ckpt}: ZeRO-3 rank {d} mp_rank {mp} holds {held} elements, its parameters' partitions {off}"
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
    steps: _Steps,
) -> dict[str, Read]:
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
    module: dict[str, tuple[torch.Size, Path, tuple[Any, ...]]]  # name -> (shape, file, keys)
    if states.get("module") is not None:
        module = {n: (t.shape, path, ("module", n)) for n, t in states["module"].items() if t is not None}
    else:
        module = _pipeline_module(ckpt, cfg, tp_rank, stage, path)
    named = [
        (name, shape) for name, (shape, _, _) in module.items() if _key_of(name, m, expected) is not None
    ]
    unknown = [n for n in module if _key_of(n, m, expected) is None and not n.endswith("_extra_state")]
    if unknown:
        raise ValueError(f"{path}: module entries that name no table parameter: {unknown}")
    holder = nn.ParameterList()
    by_id: dict[int, str] = {}
    for name, shape in named:
        p = nn.Parameter(
            torch.empty(shape, device="meta"), requires_grad=_key_of(name, m, expected) in trainable
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
    out: dict[str, Read] = {}
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
            steps.add(state["step"], str(path))
            _, wpath, wkeys = module[name]
            at = {"master": (wpath, wkeys), **{s: (path, ("optimizer", "state", i, s)) for s in STATES}}
            out[name] = _Entries(at)
    return out


def _pipeline_module(
    ckpt: Path, cfg: Config, tp_rank: int, stage: int, path: Path
) -> dict[str, tuple[torch.Size, Path, tuple[Any, ...]]]:
    """A pipeline stage's weights in its ``PipelineModule``'s parameter order, from the per-layer files
    (``layer_{idx}-model_{tp}``, written by data-parallel rank 0; the stage's layers per
    ``layout.pipeline_parts``): name -> (shape, file, keys). A tied embedding is the ``tied_modules``
    entry, registered before the numbered layers; the last stage's copy has no file of its own
    (DeepSpeed saves the tied head as a function), so its values are layer 0's."""
    m = cfg.model
    p = cfg.parallel
    parts = layout.pipeline_parts(m, cfg.derived.padded_vocab_size, p.tensor, p.pipeline, p.partition_method)
    indices = range(parts[stage], parts[stage + 1])
    head = layout.num_list_layers(m) - 1
    module: dict[str, tuple[torch.Size, Path, tuple[Any, ...]]] = {}
    tied = m.tie_embeddings and (0 in indices or head in indices)
    if tied:
        if m.family != "llama":
            raise ValueError(
                f"{path}: model.family={m.family} with tied embeddings in a pipeline at zero.stage 0: the tied "
                "head's parameters cannot be named from DeepSpeed's layer files; not supported"
            )
        file = ckpt / f"layer_00-model_{tp_rank:02d}-model_states.pt"
        embedding = _load(file)
        for lp in layout.tied_params(m):
            name = lp.spec.name
            module[f"tied_modules.embed.{name}"] = (embedding[name].shape, file, (name,))
    for index in indices:
        if tied and index in (0, head):
            continue
        file = ckpt / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"
        for name, value in _load(file).items():
            module[f"{index}.{name}"] = (value.shape if value is not None else torch.Size(), file, (name,))
    return module


class _DeepSpeedSource:
    """Per layout key: per tensor rank, where its values are (the first, and a tied embedding's second
    copy, which must equal it)."""

    def __init__(self, ckpt: Path, m: ModelConfig, padded: int, expected: dict[str, layout.LayerParam]):
        self.ckpt, self.m, self.padded, self.expected = ckpt, m, padded, expected
        self.reads: dict[str, list[list[Read]]] = {}

    def keys(self) -> list[str]:
        return [key for key in self.expected if key in self.reads]

    def read(self, key: str, which: tuple[str, ...]) -> Values:
        lp = self.expected[key]
        files = _Files()
        try:
            shards: list[Values] = []
            for t, copies in enumerate(self.reads[key]):
                first = {w: v.float() for w, v in copies[0](files, which).items()}
                for other in copies[1:]:  # DeepSpeed keeps a tied embedding's stage copies equal
                    if any(not torch.equal(first[w], v.float()) for w, v in other(files, which).items()):
                        raise ValueError(
                            f"{self.ckpt}: the copies of {key} differ between pipeline stages (tensor rank {t})"
                        )
                shards.append(first)
        finally:
            files.close()
        return _merge(self.ckpt, lp, self.m, self.padded, shards, which)


def _merge(
    where: Path,
    lp: layout.LayerParam,
    m: ModelConfig,
    padded: int,
    shards: list[Values],
    which: tuple[str, ...],
) -> Values:
    """Tensor ranks' values of one key merged to full tensors, checked against the table's shape."""
    want = layout.full_shape(lp.spec, m, padded)
    out = {}
    for what in which:
        merged = layout.merge([s.pop(what) for s in shards], lp.spec.split, f"{lp.key} ({what})")
        if tuple(merged.shape) != want:
            raise ValueError(
                f"{where}: {lp.key} {what} merges to {tuple(merged.shape)}, the table says {want}"
            )
        out[what] = merged
    return out


class _LayoutFreeSource:
    """The reshard tool's format: safetensors shards by layout key (see the module docstring)."""

    def __init__(
        self, ckpt: Path, m: ModelConfig, padded: int, tp: int, expected: dict[str, layout.LayerParam]
    ):
        self.ckpt, self.m, self.padded, self.tp, self.expected = ckpt, m, padded, tp, expected
        self.stage: dict[str, int] = {}  # key -> the first pipeline stage holding it
        for kind in ("weights", "optim"):
            for f in sorted((ckpt / kind).glob("tp00_pp*.safetensors")):
                if kind == "optim":
                    with safe_open(str(f), "pt") as sf:
                        for name in sf.keys():
                            what, _, key = name.partition("/")
                            if what == "exp_avg":
                                self.stage.setdefault(key, int(f.stem.split("_pp")[1]))

    def keys(self) -> list[str]:
        return [key for key in self.expected if key in self.stage]

    def _file(self, kind: str, t: int, p: int) -> Path:
        path = self.ckpt / kind / f"tp{t:02d}_pp{p:02d}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (checkpoint incomplete)")
        return path

    def read(self, key: str, which: tuple[str, ...]) -> Values:
        p = self.stage[key]
        shards = []
        for t in range(self.tp):
            values = {}
            for what in which:
                kind, name = ("weights", key) if what == "master" else ("optim", f"{what}/{key}")
                with safe_open(str(self._file(kind, t, p)), "pt") as sf:
                    values[what] = sf.get_tensor(name)
            shards.append(values)
        return _merge(self.ckpt, self.expected[key], self.m, self.padded, shards, which)


def _check_coverage(ckpt: Path, found: set[str], trainable: set[str], incomplete: list[str]) -> None:
    missing, extra = sorted(trainable - found), sorted(found - trainable)
    if missing or extra or incomplete:
        raise ValueError(
            f"{ckpt}: optimizer state does not cover the model exactly once: missing {missing}, "
            f"not trainable by the saved config {extra}, some tensor ranks absent {sorted(incomplete)}"
        )


def open_optimizer_state(checkpoint_dir: str | Path) -> OptimizerState:
    """Open a bigtrain checkpoint (``RUN_DIR/checkpoints/step_X``) saved at any layout and ZeRO stage,
    or written by ``tools/reshard_checkpoint.py``, for reading its fp32 masters and Adam moments one
    layout key at a time (:meth:`OptimizerState.tensors`); no process group needed.

    Reads the scalars and every file's metadata now (no tensor data) and checks coverage: every
    trainable key of the saved model is found exactly once. Raises FileNotFoundError for a missing file,
    and ValueError naming the file for what cannot be read or named: a truncated or corrupt file, a
    layout key found twice or not at all, step counts that differ, a flat group whose size does not add
    up, or an unsupported combination (ZeRO-0 with layer decay, a bert pipeline at ZeRO-0, optimizers
    without Adam moments)."""
    from bigtrain.registry import task_params
    from bigtrain.resume_rules import saved_config

    ckpt = Path(checkpoint_dir)
    meta_path = ckpt / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{ckpt}: no {META} (not a bigtrain checkpoint step directory)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_path}: unreadable ({e})") from None
    cfg = saved_config(meta)
    if cfg.optim.name not in ("adamw", "adam"):
        raise ValueError(f"{ckpt}: optim.name={cfg.optim.name}: only Adam's moments are extracted")
    tp, pp, dp = (int(meta["layout"][k]) for k in ("tensor", "pipeline", "data_parallel"))
    dp *= int(meta["layout"].get("context", 1))  # ZeRO partitions over data x context ranks
    m = cfg.model
    padded = cfg.derived.padded_vocab_size
    expected = {lp.key: lp for lp in layout.iter_layer_params(m, task=task_params(cfg))}
    trainable = set(trainable_keys(cfg, expected))
    frozen = [k for k in expected if k not in trainable]
    stage = cfg.zero.stage if cfg.precision == "fp32" or cfg.zero.stage else 1  # engine.deepspeed_config
    saved_layout = {"tensor": tp, "pipeline": pp, "data_parallel": dp}

    if meta.get("optimizer_format") == LAYOUT_FREE:
        lf = _LayoutFreeSource(ckpt, m, padded, tp, expected)
        _check_coverage(ckpt, set(lf.stage), trainable, [])
        scalars: dict[str, Any] = {k: _load(ckpt / OPTIM_STATE)[k] for k in SCALARS}
        return OptimizerState(
            config=cfg,
            layout=saved_layout,
            zero_stage=cfg.zero.stage,
            optimizer=LAYOUT_FREE,
            padded_vocab_size=padded,
            source=lf,
            **scalars,
        )

    bf16 = any(ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    kind = "bf16" if bf16 else {0: "torch", 1: "zero", 2: "zero", 3: "zero3"}[stage]
    steps = _Steps(ckpt)
    source = _DeepSpeedSource(ckpt, m, padded, expected)
    seen: dict[str, int] = {}  # key -> pipeline stage it was taken from (tied embeddings: the first)
    for p in range(pp):
        for t in range(tp):
            mp = p * tp + t if pp > 1 else t  # DeepSpeed's checkpoint mp_rank (a pipeline: the grid's)
            if kind == "torch":
                by_name = _zero0(ckpt, cfg, mp, t, p, expected, trainable, steps)
            elif kind == "zero3":
                by_name = _zero3(ckpt, mp, dp, steps)
            else:
                by_name = _zero12(ckpt, mp, dp, bf16, steps)
            for name, read in by_name.items():
                key = _key_of(name, m, expected)
                if key is None:
                    raise ValueError(f"{ckpt}: mp_rank {mp}: parameter {name} names no layout key")
                slots = source.reads.setdefault(key, [[] for _ in range(tp)])
                if seen.setdefault(key, p) == p and slots[t]:
                    raise ValueError(f"{ckpt}: {key} appears twice for tensor rank {t} (mp_rank {mp} {name})")
                slots[t].append(read)  # a tied embedding's second copy (the last stage's): checked on read
    incomplete = [k for k, v in source.reads.items() if any(not s for s in v)]
    _check_coverage(ckpt, set(source.reads), trainable, incomplete)
    if not steps.seen:
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
        layout=saved_layout,
        zero_stage=stage,
        optimizer=kind,
        padded_vocab_size=padded,
        step=int(next(iter(steps.seen))),
        frozen=frozen,
        global_steps=int(states["global_steps"]),
        global_samples=int(states["global_samples"]),
        skipped_steps=int(states["skipped_steps"]),
        lr_scheduler=states.get("lr_scheduler"),
        loss_scaler=scaler,
        client_state=dict(states.get("bigtrain") or {}),
        source=source,
    )


class _InMemory:
    def __init__(self, values: dict[str, Values]):
        self.values = values

    def keys(self) -> list[str]:
        return list(self.values)

    def read(self, key: str, which: tuple[str, ...]) -> Values:
        return {what: self.values[key][what] for what in which}


def read_optimizer_state(checkpoint_dir: str | Path) -> OptimizerState:
    """:func:`open_optimizer_state` with every key read into memory at once (``master``/``exp_avg``/
    ``exp_avg_sq`` dicts are then free): for tests and small models. Same errors."""
    state = open_optimizer_state(checkpoint_dir)
    state.source = _InMemory({key: state.tensors(key) for key in state.keys()})
    return state
