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
