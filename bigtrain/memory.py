"""Measuring memory by accounting: the bytes of the tensors a process really holds.

On CPU, process RSS does not show ZeRO-3's savings (freed partitions stay in the allocator's arenas;
see the field notes), so ZeRO memory is proven by walking the objects that own tensors — the DeepSpeed
engine, its module, its optimizer and their partitions — and summing the distinct storages they hold.
Activation memory is measured with ``saved_tensors_hooks``: the distinct storages autograd keeps for
the backward pass. :mod:`bigtrain.planner` predicts both; the tests compare the two.
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_SKIP = (
    types.ModuleType,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.CodeType,
    str,
    bytes,
    int,
    float,
    bool,
    complex,
    type(None),
)


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    if t.device.type == "meta":
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse/quantized: not used by bigtrain
        return None
    return (str(t.device), storage.data_ptr(), storage.nbytes())


def held_tensor_bytes(*roots: Any) -> dict[str, int]:
    """Distinct tensor storages reachable from ``roots`` (attributes, containers, ``.grad``), summed
    per device: ``{"cpu": bytes, ...}``. Views of one flat buffer count once, at the buffer's size."""
    seen: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    todo: deque[Any] = deque(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, _SKIP):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key is not None and key[1] != 0:
                storages[key[:2]] = max(storages.get(key[:2], 0), key[2])
            if obj.is_leaf and obj.grad is not None:
                todo.append(obj.grad)
            todo.extend(getattr(obj, "__dict__", {}).values())  # e.g. ZeRO-3's ds_tensor partition
            continue
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            todo.extend(obj)
        else:
            todo.extend(getattr(obj, "__dict__", {}).values())
            for slot in getattr(type(obj), "__slots__", ()):
                if isinstance(slot, str) and hasattr(obj, slot):
                    todo.append(getattr(obj, slot))
    totals: dict[str, int] = {}
    for (device, _), nbytes in storages.items():
        totals[device] = totals.get(device, 0) + nbytes
    return totals


class SavedTensors:
    """Bytes autograd saves for backward inside the context (distinct storages), and the largest
    single saved storage. Parameters are excluded: they are held whether or not anything is saved."""

    def __init__(self) -> None:
        self.storages: dict[tuple[str, int], int] = {}
        self._params: set[tuple[str, int]] = set()

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def exclude(self, tensors: Iterator[torch.Tensor]) -> None:
        for t in tensors:
            key = _storage_key(t)
            if key is not None:
                self._params.add(key[:2])

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key[:2] not in self._params:
            self.storages[key[:2]] = max(self.storages.get(key[:2], 0), key[2])
        return t

    @contextmanager
    def record(self) -> Iterator[SavedTensors]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _identity):
            yield self


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def saved_activation_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of activations saved by one ``forward()`` of ``model`` (parameters excluded)."""
    saved = SavedTensors()
    saved.exclude(model.parameters())
    with saved.record():
        loss = forward()
    del loss
    return saved.bytes


def rank_saved_activation_bytes(config: str, overrides: list[str]) -> int:
    """Bytes of activations this rank saves for one micro-batch of the config at ``config`` (with
    ``overrides``) in a real process group (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set): bigtrain's
    process groups (``init_distributed``) and model (``build_model``) in the training precision, fed this
    rank's part of one fixed micro-batch (tensor ranks the whole sequence, context ranks their chunk, as
    training cuts it: ``step_runner.to_device``); the groups are torn down after. What
    :func:`bigtrain.planner.activation_memory` predicts per rank (tests/test_planner.py,
    tools/bench_activation_memory.py)."""
    import os

    from bigtrain.config import load_config, torch_dtype
    from bigtrain.distributed import init_distributed, shutdown
    from bigtrain.registry import build_model
    from bigtrain.step_runner import to_device

    cfg = load_config(config, overrides).resolve(int(os.environ["WORLD_SIZE"]))
    dist = init_distributed(cfg)
    try:
        # in the training precision, as DeepSpeed casts it (bf16: the activations are bf16)
        model = build_model(cfg, topology=dist.topology).to(torch_dtype(cfg.precision))
        b, s = cfg.train.micro_batch_size, cfg.model.seq_length
        assert cfg.model.vocab_size is not None
        # the same tokens on every rank (a fixed generator); to_device keeps this context rank's chunk
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
        batch = to_device({"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(b, s)}, dist.device)
        # a chunk is a view of the whole [b, s] batch on CPU (to a GPU it is copied into its own tensor):
        # compact it, so that the loss's saved mask counts this rank's chunk, not the batch it came from
        batch = {k: v.contiguous() for k, v in batch.items()}
        return saved_activation_bytes(
            model, lambda: model(batch["tokens"], batch["labels"], batch["loss_mask"])
        )
    finally:
        shutdown()
