"""``torchrun ... -m tests.comm_count_worker OUT_DIR RUNS_JSON``: one rank of real ``bigtrain.pretrain``
runs, one after another in the same processes (``RUNS_JSON``: ``{name: {"port": P, "args": [pretrain args...]}}``;
each run rendezvouses on its own TCP store at port ``P``, since a second world on torchrun's agent store
finds the first one's stale addresses), with every
``torch.distributed`` collective counted (tests/test_comm_volume.py).

The wrapper is installed before DeepSpeed or megatron-core is imported (DeepSpeed's torch backend keeps
references to ``all_gather_into_tensor``/``reduce_scatter_tensor`` from its start-up), in both
``torch.distributed`` and ``torch.distributed.distributed_c10d``. A call is recorded once, at its outermost
wrapped function (``all_gather_object`` calling ``all_gather`` counts as the former). Calls made inside
``Trainer.train_step`` are tagged ``step{N}`` (N counting from 1); the rest (process-group set-up, DeepSpeed's initial parameter
broadcast, validation, logging) ``other``; each record names its run.

Bytes of a call: its largest tensor argument, a list of tensors summed: the full buffer each rank
contributes to (all-reduce: the tensor; reduce-scatter: its input; all-gather: its output), the unit
``bigtrain.planner.comm_bytes`` predicts in. Each rank writes ``OUT_DIR/rank{R}.json``."""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.distributed.distributed_c10d as c10d

OPS = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)

RECORDS: list[dict[str, Any]] = []
STATE = threading.local()
PHASE = {"name": "other", "run": ""}


def _payload(args: tuple, kwargs: dict) -> tuple[int, int, str]:
    """(bytes, elements, dtype) of the largest tensor argument (a list of tensors summed)."""
    best = (0, 0, "")
    for value in [*args, *kwargs.values()]:
        tensors = [value] if torch.is_tensor(value) else []
        if isinstance(value, list | tuple) and value and all(torch.is_tensor(t) for t in value):
            tensors = list(value)
        if tensors:
            size = sum(t.numel() * t.element_size() for t in tensors)
            if size > best[0]:
                best = (size, sum(t.numel() for t in tensors), str(tensors[0].dtype))
    return best


def _group_name(group: Any) -> str:
    """Which of megatron-core's groups ``group`` is (``tp``, ``dp`` (with or without context), ``cp``, ``pp``,
    ``mp``), else ``world``/``other``."""
    from megatron.core import parallel_state as ps

    if group is None or group is c10d.GroupMember.WORLD:
        return "world"
    if not ps.model_parallel_is_initialized():
        return "other"
    for name, get in (
        ("tp", ps.get_tensor_model_parallel_group),
        ("dp", ps.get_data_parallel_group),
        ("cp", ps.get_context_parallel_group),
        # DeepSpeed reduces over the data x context group (the same ranks without context parallelism)
        ("dp", lambda: ps.get_data_parallel_group(with_context_parallel=True)),
        ("pp", ps.get_pipeline_model_parallel_group),
        ("mp", ps.get_model_parallel_group),
    ):
        if group is get():
            return name
    return "other"


def _counting(op: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(STATE, "depth", 0)
        if depth == 0:
            size, numel, dtype = _payload(args, kwargs)
            group = kwargs.get("group")
            if group is None:  # positional: the argument named ``group``
                names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
                if "group" in names and names.index("group") < len(args):
                    group = args[names.index("group")]
            RECORDS.append(
                {
                    "op": op,
                    "bytes": size,
                    "numel": numel,
                    "dtype": dtype,
                    "group": _group_name(group),
                    "group_size": tdist.get_world_size(group),
                    "phase": PHASE["name"],
                    "run": PHASE["run"],
                }
            )
        STATE.depth = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            STATE.depth = depth

    wrapper.__wrapped_for_counting__ = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    for op in OPS:
        original = getattr(c10d, op, None)
        if original is None or getattr(original, "__wrapped_for_counting__", False):
            continue
        wrapped = _counting(op, original)
        setattr(c10d, op, wrapped)
        if getattr(tdist, op, None) is original:
            setattr(tdist, op, wrapped)


def main(argv: list[str]) -> None:
    out_dir, runs_json = argv
    install()
    from bigtrain import pretrain
    from bigtrain.trainer import Trainer

    train_step = Trainer.train_step

    def counted_step(self: Trainer) -> Any:
        PHASE["name"] = f"step{self.state.step + 1}"
        try:
            return train_step(self)
        finally:
            PHASE["name"] = "other"

    Trainer.train_step = counted_step  # type: ignore[method-assign]
    rank = int(os.environ["RANK"])
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 serves a fresh store per run
    for name, run in json.loads(Path(runs_json).read_text()).items():
        PHASE["run"] = name
        os.environ["MASTER_PORT"] = str(run["port"])
        pretrain.main(run["args"])  # returns after shutdown(): the next run starts a fresh world
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(RECORDS))


if __name__ == "__main__":
    main(sys.argv[1:])
