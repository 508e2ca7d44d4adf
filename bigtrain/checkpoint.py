"""Checkpoints: DeepSpeed's files for exact resume, plus bigtrain's own layout-independent weights.

``RUN_DIR/checkpoints/step_00000020/`` holds
- DeepSpeed's model/optimizer/scheduler files (any ZeRO stage, pipeline or not) for exact resume;
- ``weights/tp{T}_pp{P}.safetensors``: each tensor-parallel x pipeline rank's fp32 *master* weights,
  keyed by layout key (``"3.attention.qkv.weight"``), written by data-parallel rank 0; conversion and
  weights-only loads read only these, whatever the ZeRO stage was;
- ``rng/rank{R}.pt``: every rank's RNG states;
- ``bigtrain.json``: the resolved config, step, consumed samples and layout.
A save goes to a hidden temporary directory that is renamed when every rank has finished, and only
then the ``latest`` pointer is replaced (temp file + rename), so a crash never leaves ``latest``
pointing at a partial checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bigtrain.config import Config, ModelConfig, config_from_dict
from bigtrain.distributed import Dist, barrier
from bigtrain.models import layout

LATEST = "latest"
META = "bigtrain.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) / "checkpoints"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (ckpt_dir / tag / META).is_file() else None


def list_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_") and (p / META).is_file())


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


def fp32_master_weights(engine, cfg: Config) -> dict[str, torch.Tensor]:
    """This rank's (tensor x pipeline) shards as fp32 masters, keyed by layout key.

    A collective over the data-parallel group under ZeRO (every rank must call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from bigtrain.models.parallelize import local_parameters

    out = {}
    for key, (_, param) in local_parameters(engine.module, cfg).items():
        full = safe_get_full_fp32_param(param)
        out[key] = (param.detach() if full is None else full).float().cpu().contiguous()
    return out


def save_checkpoint(engine, cfg: Config, dist: Dist, step: int, state: dict[str, Any]) -> Path:
    """Save everything needed to resume at ``step``; returns the final directory."""
    ckpt_dir = checkpoints_dir(cfg)
    tag, tmp_tag = tag_for(step), f".tmp_{tag_for(step)}"
    tmp = ckpt_dir / tmp_tag
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    client_state = {"bigtrain": {**state, "step": step}}
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    weights = fp32_master_weights(engine, cfg)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank{dist.rank:05d}.pt")
    if dist.dp_rank == 0:
        (tmp / "weights").mkdir(exist_ok=True)
        save_file(weights, str(tmp / "weights" / f"tp{dist.tp_rank:02d}_pp{dist.pp_rank:02d}.safetensors"))
    barrier()
    final = ckpt_dir / tag
    if dist.is_main:
        meta = {
            "step": step,
            **state,
            "layout": {"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline},
            "config": cfg.to_dict(),
        }
        _write_atomic(tmp / META, json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, cfg.checkpoint.keep_last, keep=tag)
    barrier()
    return final


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = list_tags(ckpt_dir)
    for old in tags[:-keep_last]:
        if old != keep:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


# ---------------------------------------------------------------------------- loading
def resume(engine, cfg: Config, dist: Dist) -> dict[str, Any] | None:
    """Resume from ``run_dir/checkpoints/latest`` if there is one; returns the saved training state."""
    ckpt_dir = checkpoints_dir(cfg)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    meta = json.loads((ckpt_dir / tag / META).read_text())
    saved = meta["layout"]
    if (saved["tensor"], saved["pipeline"]) != (cfg.parallel.tensor, cfg.parallel.pipeline):
        raise RuntimeError(
            f"{ckpt_dir / tag} was saved at tensor={saved['tensor']} pipeline={saved['pipeline']}; resuming "
            f"optimizer state at tensor={cfg.parallel.tensor} pipeline={cfg.parallel.pipeline} is not supported. "
            f"Start a new run_dir with checkpoint.load={ckpt_dir / tag} (weights only, any layout)."
        )
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / "rng" / f"rank{dist.rank:05d}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=False))
    return client_state["bigtrain"]


def resolve_weights_dir(path: str | Path) -> Path:
    """A checkpoint tag directory, or a checkpoints directory with a ``latest`` pointer."""
    p = Path(path)
    if (p / "weights").is_dir():
        return p
    tag = latest_tag(p)
    if tag is not None:
        return p / tag
    if (p / "checkpoints").is_dir():
        return resolve_weights_dir(p / "checkpoints")
    raise FileNotFoundError(f"{p}: not a bigtrain checkpoint (no weights/ and no valid 'latest' pointer)")


class WeightReader:
    """Full (unsharded) tensors by layout key from a checkpoint saved at any layout, one at a time."""

    def __init__(self, path: str | Path):
        self.dir = resolve_weights_dir(path)
        self.meta = json.loads((self.dir / META).read_text())
        self.tensor = self.meta["layout"]["tensor"]
        self.files: dict[tuple[int, int], Path] = {}
        for f in sorted((self.dir / "weights").glob("tp*_pp*.safetensors")):
            tp, pp = f.stem[2:].split("_pp")
            self.files[(int(tp), int(pp))] = f
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
        "num_layers": lambda m: m.num_layers,
        "hidden_size": lambda m: m.hidden_size,
        "num_attention_heads": lambda m: m.num_attention_heads,
        "num_kv_heads": lambda m: m.kv_heads,
        "ffn_hidden_size": lambda m: m.ffn_size,
        "vocab_size": lambda m: m.vocab_size,
        "tie_embeddings": lambda m: m.tie_embeddings,
    }
    return [
        f"model.{name}: checkpoint {get(saved)} vs config {get(current)}"
        for name, get in fields.items()
        if get(saved) != get(current)
    ]


@torch.no_grad()
def load_weights_only(model: torch.nn.Module, cfg: Config, path: str | Path) -> dict[str, Any]:
    """Fill this rank's parameters from a checkpoint of any layout (fresh optimizer, step 0)."""
    from bigtrain.models.parallelize import local_parameters, tp_rank_size

    reader = WeightReader(path)
    diffs = model_shape_differences(config_from_dict(reader.meta["config"]).model, cfg.model)
    if diffs:
        raise ValueError(f"{reader.dir}: model shape differs from the config: " + "; ".join(diffs))
    rank, size = tp_rank_size()
    for lp, param in local_parameters(model, cfg).values():
        full = reader.full(lp)
        if lp.spec.split == "vocab" and full.shape[0] != cfg.derived.padded_vocab_size:
            resized = full.new_zeros(cfg.derived.padded_vocab_size, full.shape[1])
            n = min(full.shape[0], cfg.model.vocab_size)
            resized[:n] = full[:n]
            full = resized
        param.copy_(layout.shard(full, lp.spec.split, rank, size).to(param.dtype))
    return reader.meta
