"""Reshard a bigtrain checkpoint to another parallel layout, optimizer state included (issue 17).

    # into a new step directory (a new run's checkpoints/, or anywhere)
    python tools/reshard_checkpoint.py RUN/checkpoints/step_00000120 --tensor 1 --pipeline 1 \\
        --data-parallel 4 --zero-stage 2 --out NEW_RUN/checkpoints/step_00000120
    # in place: the newest valid checkpoint of RUN is replaced; the original is kept beside it
    python tools/reshard_checkpoint.py RUN --tensor 2 --pipeline 2 --in-place

SRC is a checkpoint step directory, or a run / checkpoints directory (its newest valid checkpoint). The
source is verified against its manifest first (sizes and sha256). The output is a *layout-free*
checkpoint (``bigtrain.json`` ``"optimizer_format": "layout_free"``) that bigtrain resumes at the target
layout, read by ``bigtrain.reshard.open_optimizer_state``:

- ``weights/tp{t:02d}_pp{p:02d}.safetensors``: fp32 masters of every parameter (frozen ones included),
  sharded for the target tensor size, stages as the target's pipeline partitioning places them, the
  vocabulary padded for the target tensor size (rows beyond the true vocabulary zero);
- ``optim/tp{t:02d}_pp{p:02d}.safetensors``: ``exp_avg/<key>`` and ``exp_avg_sq/<key>`` of every
  trainable parameter, sharded alike;
- ``optim/state.pt``: Adam's step, DeepSpeed's step/sample/skip counters, LR schedule, loss scaler,
  bigtrain's client state, the frozen keys;
- ``rng/`` (copied), ``bigtrain.json`` (layout and config at the target, ``resharded_from``) and
  ``manifest.json``.

Memory: one parameter at a time (its full master and moments plus one shard being written), read from
memory-mapped source files and streamed into the output files, so the peak is a small multiple of the
largest tensor, not of the model. Writes are atomic: everything goes to ``.tmp_*`` beside the output
(removed by bigtrain at start-up if interrupted), is fsync'ed, then renamed into place. Exit 2 with one
line naming the file or field for a corrupt or partial source or an impossible target.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bigtrain import checkpoint_files as files
from bigtrain.checkpoint import WeightReader
from bigtrain.checkpoint_files import META, TMP_PREFIX
from bigtrain.config import Config, ConfigError, ModelConfig
from bigtrain.models import layout
from bigtrain.reshard import (
    LAYOUT_FREE,
    OPTIM_STATE,
    SCALARS,
    STATES,
    WHAT,
    OptimizerState,
    open_optimizer_state,
)

BACKUP_SUFFIX = ".pre_reshard"  # --in-place keeps the original here: not a step_<digits> tag, never resumed


class Refused(Exception):
    """The source or the target cannot be resharded (exit 2)."""


# ---------------------------------------------------------------------------- source
def resolve_source(path: str | Path) -> Path:
    """The checkpoint step directory to reshard: ``path`` itself, or the newest valid checkpoint of a run
    or checkpoints directory. Refused if it does not verify against its manifest."""
    p = Path(path)
    if not p.exists():
        raise Refused(f"{p}: no such file or directory")
    if not ((p / META).is_file() or (p / files.MANIFEST).is_file()):
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        tag = files.newest_valid(ckpt_dir)
        if tag is None:
            raise Refused(f"{p}: not a checkpoint step directory, and no valid step_* checkpoint under it")
        p = ckpt_dir / tag
    problems = files.verify(p)
    if problems:
        raise Refused(f"{p} is not a complete checkpoint: " + "; ".join(problems))
    return p


# ---------------------------------------------------------------------------- target
def target_config(saved: Config, tensor: int, pipeline: int, data_parallel: int, zero_stage: int) -> Config:
    """The saved config at the target layout, validated and its derived values (data-parallel size,
    padded vocabulary, ...) re-resolved; :class:`Refused` naming the field that makes it impossible."""
    cfg = copy.deepcopy(saved)
    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.zero.stage = tensor, pipeline, zero_stage
    if cfg.model.moe.num_experts and tensor > 1:
        cfg.parallel.sequence_parallel = True  # megatron's MoE layer trains only so; it changes no weight
    if cfg.zero.stage == 0:
        cfg.zero.offload_optimizer = False  # offload needs ZeRO >= 1: a ZeRO-0 target runs without it
    try:
        return cfg.resolve(tensor * pipeline * data_parallel)
    except ConfigError as e:
        raise Refused(
            f"target parallel.tensor={tensor} parallel.pipeline={pipeline} data-parallel={data_parallel} "
            f"zero.stage={zero_stage} is impossible for this model: {e}"
        ) from None


def stage_keys(m: ModelConfig, task: layout.TaskParams, parts: list[int]) -> list[list[str]]:
    """Layout keys each pipeline stage holds (``parts`` from ``layout.pipeline_parts``): its layers', and
    a tied head's copy of the word embedding on the last stage (as ``layout.local_layer_params``)."""
    head = layout.num_list_layers(m) - 1
    out = []
    for s in range(len(parts) - 1):
        indices = list(range(parts[s], parts[s + 1]))
        keys = [lp.key for lp in layout.iter_layer_params(m, indices, task)]
        if head in indices and 0 not in indices and task.head is None:
            keys = [lp.key for lp in layout.tied_params(m)] + keys
        out.append(keys)
    return out


def repad_vocab(full: torch.Tensor, lp: layout.LayerParam, m: ModelConfig, padded: int) -> torch.Tensor:
    """A vocab-split tensor at another padded vocabulary size: the true vocabulary's rows kept, padding
    rows zero (as ``checkpoint.load_weights_only`` pads weights; Adam's moments of rows that no token
    reaches are zero too)."""
    if lp.spec.split != "vocab" or full.shape[0] == padded:
        return full
    if m.vocab_size is None:
        raise Refused(f"{lp.key}: model.vocab_size is not set in the checkpoint's config")
    out = full.new_zeros(padded, *full.shape[1:])
    n = min(full.shape[0], m.vocab_size)
    out[:n] = full[:n]
    return out


# ---------------------------------------------------------------------------- streaming safetensors
class SafetensorsWriter:
    """A safetensors file written one tensor at a time, in a declared order: the library's ``save_file``
    needs every tensor in memory at once, which for one tensor-rank's file of a 70B model is the bound
    this tool must not pay. The header (names, shapes, offsets) is known up front from the layout table;
    the result is read back by ``safetensors.safe_open`` like any other file."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]]):
        self.path, self.entries, self.next = path, entries, 0
        header: dict[str, Any] = {}
        offset = 0
        for name, shape in entries:
            size = 4 * int(torch.Size(shape).numel())  # float32
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: BinaryIO = open(path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_shape = self.entries[self.next]
        if name != want_name or tuple(tensor.shape) != tuple(want_shape):
            raise RuntimeError(
                f"{self.path}: writing {name} {tuple(tensor.shape)}, the header declares {want_name} {want_shape}"
            )
        # the array's own buffer (no bytes copy); contiguous() copies only a column (row-split) shard
        self.file.write(tensor.detach().to(torch.float32).contiguous().numpy().data)
        self.next += 1

    def close(self) -> None:
        complete = self.next == len(self.entries)
        self.file.close()
        if not complete:
            raise RuntimeError(f"{self.path}: {self.next} of {len(self.entries)} tensors written")


# ---------------------------------------------------------------------------- writing
def write_resharded(
    state: OptimizerState,
    src: Path,
    cfg: Config,
    data_parallel: int,
    out: Path,
    origin: Path,
    progress: Callable[[str], None] = lambda key: None,
) -> int:
    """Write the layout-free checkpoint of ``state`` (opened from ``src``) at ``cfg``'s layout into the
    new directory ``out``, one parameter at a time; returns the number of parameters. ``origin``: where
    the source will be (``resharded_from.path``). ``progress(key)`` is called after each parameter (tests
    use it to interrupt a write)."""
    from bigtrain.registry import task_params

    m, tp, pp = cfg.model, cfg.parallel.tensor, cfg.parallel.pipeline
    padded = cfg.derived.padded_vocab_size
    task = task_params(cfg)
    params = list(layout.iter_layer_params(m, task=task))
    trainable = set(state.keys())
    parts = layout.pipeline_parts(m, padded, tp, pp, cfg.parallel.partition_method)
    stages: dict[str, list[int]] = {}
    for s, keys in enumerate(stage_keys(m, task, parts)):
        for key in keys:
            stages.setdefault(key, []).append(s)
    weights: dict[tuple[int, int], list[tuple[str, tuple[int, ...]]]] = {}
    optim: dict[tuple[int, int], list[tuple[str, tuple[int, ...]]]] = {}
    for lp in params:
        shape = layout.local_shape(lp.spec, m, padded, tp)
        for s in stages[lp.key]:
            for t in range(tp):
                weights.setdefault((t, s), []).append((lp.key, shape))
                if lp.key in trainable:
                    optim.setdefault((t, s), []).extend((f"{what}/{lp.key}", shape) for what in STATES)
    reader = WeightReader(src) if state.frozen else None  # frozen tensors: the source's weights/ only
    writers: dict[tuple[str, int, int], SafetensorsWriter] = {}
    try:
        for kind, table in (("weights", weights), ("optim", optim)):
            for (t, s), entries in table.items():
                writers[(kind, t, s)] = SafetensorsWriter(
                    out / kind / f"tp{t:02d}_pp{s:02d}.safetensors", entries
                )
        for lp in params:
            # one full tensor in memory at a time: the master, then each moment
            for what in WHAT if lp.key in trainable else ("master",):
                if lp.key in trainable:
                    full = state.tensors(lp.key, (what,))[what]
                else:
                    assert reader is not None
                    full = reader.full(lp)
                full = repad_vocab(full, lp, m, padded)
                for t in range(tp):
                    piece = layout.shard(full, lp.spec.split, t, tp)
                    for s in stages[lp.key]:
                        if what == "master":
                            writers[("weights", t, s)].write(lp.key, piece)
                        else:
                            writers[("optim", t, s)].write(f"{what}/{lp.key}", piece)
                    del piece
                del full
            progress(lp.key)
    finally:
        for w in writers.values():
            w.file.close()
    for w in writers.values():
        w.close()  # every declared tensor written

    torch.save({k: getattr(state, k) for k in SCALARS}, out / OPTIM_STATE)
    if (src / "rng").is_dir():
        shutil.copytree(src / "rng", out / "rng")
    meta = json.loads((src / META).read_text())
    saved = state.layout
    meta["resharded_from"] = {
        "tensor": saved["tensor"],
        "pipeline": saved["pipeline"],
        "data_parallel": saved["data_parallel"],
        "zero_stage": state.config.zero.stage,
        "path": str(origin.resolve()),
    }
    meta["layout"] = {"tensor": tp, "pipeline": pp, "data_parallel": data_parallel}
    meta["config"] = cfg.to_dict()
    meta["optimizer_format"] = LAYOUT_FREE
    (out / META).write_text(json.dumps(meta, indent=2))
    files.write_manifest(out, {}, int(meta["step"]))  # fsyncs every file and directory
    return len(params)


def _hardlink_copy(src: Path, dst: Path) -> None:
    """A copy of a checkpoint directory that costs no space (files are never modified in place)."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:  # a file system without hard links
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    files.fsync_dir(dst.parent)


def reshard(
    source: str | Path,
    tensor: int,
    pipeline: int,
    data_parallel: int | None = None,
    zero_stage: int | None = None,
    out: str | Path | None = None,
    in_place: bool = False,
    progress: Callable[[str], None] = lambda key: None,
) -> tuple[Path, Path, OptimizerState, Config]:
    """Reshard checkpoint ``source`` to the target layout (data-parallel size and ZeRO stage default to
    the source's) into ``out``, or in place; returns (source step dir, written step dir, the source's
    state, target config). Raises :class:`Refused` for a bad source or target; the output directory
    appears complete or not at all."""
    if (out is None) == (not in_place):
        raise Refused("give exactly one of --out DIR and --in-place")
    src = resolve_source(source)
    expert = json.loads((src / META).read_text()).get("layout", {}).get("expert", 1)
    if expert > 1:
        raise Refused(
            f"{src} was saved at parallel.expert {expert}: resharding the optimizer state of an expert-parallel "
            "checkpoint is not supported yet; resume it at parallel.expert "
            f"{expert}, or load its weights (all experts) at the new layout with checkpoint.load"
        )
    try:
        state = open_optimizer_state(src)
    except (FileNotFoundError, ValueError) as e:
        raise Refused(str(e)) from None
    dp = data_parallel or state.layout["data_parallel"]
    cfg = target_config(
        state.config, tensor, pipeline, dp, state.config.zero.stage if zero_stage is None else zero_stage
    )
    final = src if in_place else Path(out)  # type: ignore[arg-type]
    backup = src.with_name(src.name + BACKUP_SUFFIX)
    if not in_place and final.exists():
        raise Refused(f"{final}: already exists (the output must be a new directory)")
    if in_place and backup.exists():
        raise Refused(
            f"{backup}: already exists (an earlier in-place reshard's original; move it away first)"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}reshard_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_resharded(state, src, cfg, dp, tmp, backup if in_place else src, progress)
        if in_place:
            _hardlink_copy(src, backup)
            files.replace_dir(tmp, final)  # crash-safe: recover_dir restores the original at start-up
        else:
            os.replace(tmp, final)
            files.fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (FileNotFoundError, ValueError)):  # a source file that cannot be read, named
            raise Refused(str(e)) from None
        raise
    return src, final, state, cfg


def _describe(lay: dict[str, int], stage: int) -> str:
    return f"TP{lay['tensor']} PP{lay['pipeline']} DP{lay['data_parallel']} ZeRO-{stage}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Reshard a bigtrain checkpoint (weights, Adam moments, step, schedule, RNG) to another "
        "tensor/pipeline/data-parallel size and ZeRO stage.",
        epilog=f"--in-place keeps the original as STEP_DIR{BACKUP_SUFFIX} beside it (not a resumable tag: "
        "bigtrain never loads or prunes it; delete it when the resharded run is fine). Exit 2: a corrupt or "
        "partial source, or an impossible target (one line naming the file or field).",
    )
    ap.add_argument(
        "source", help="checkpoint step directory, or a run / checkpoints directory (newest valid)"
    )
    ap.add_argument("--tensor", type=int, required=True, help="target parallel.tensor")
    ap.add_argument("--pipeline", type=int, required=True, help="target parallel.pipeline")
    ap.add_argument("--data-parallel", type=int, help="target data-parallel size (default: the source's)")
    ap.add_argument("--zero-stage", type=int, help="target zero.stage (default: the source's)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="new step directory to write (must not exist)")
    where.add_argument(
        "--in-place", action="store_true", help=f"replace the source (original kept as *{BACKUP_SUFFIX})"
    )
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        src, final, state, cfg = reshard(
            args.source,
            args.tensor,
            args.pipeline,
            args.data_parallel,
            args.zero_stage,
            args.out,
            args.in_place,
        )
    except Refused as e:
        print(f"reshard_checkpoint: error: {e}", file=sys.stderr)
        return 2
    target = {
        "tensor": cfg.parallel.tensor,
        "pipeline": cfg.parallel.pipeline,
        "data_parallel": cfg.derived.data_parallel_size,
    }
    print(
        f"resharded {src} ({_describe(state.layout, state.config.zero.stage)}) -> {final} "
        f"({_describe(target, cfg.zero.stage)}): {len(state.keys())} trainable + {len(state.frozen)} frozen "
        f"parameters, step {state.global_steps}, {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
