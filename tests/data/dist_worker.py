"""One rank of the 2-process gloo test: build the datasets, read this rank's slices, report as JSON.

Run as ``python -m tests.data.dist_worker DATA_ROOT OUT_DIR`` with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch

from bigtrain.data import DataError, batch_iterator, build_datasets
from bigtrain.data.datasets import rank0_first
from tests.data.util import make_cfg

STEPS, GBS, MBS = 3, 8, 2


def blend_cfg(root: str):
    return make_cfg(
        [[0.7, f"{root}/web/web"], [0.3, f"{root}/code/code"]],
        steps=STEPS,
        gbs=GBS,
        mbs=MBS,
        cache_dir=f"{root}/cache",
    )


def main() -> None:
    torch.set_num_threads(1)
    root, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    train, valid = build_datasets(blend_cfg(root))
    it = batch_iterator(train, 0, MBS, GBS, rank, world)
    steps = []
    for _ in range(STEPS):
        micro = [next(it) for _ in range(GBS // (MBS * world))]
        steps.append(
            {
                "ids": [i for b in micro for i in b["sample_ids"].tolist()],
                "tokens": [row for b in micro for row in b["tokens"].tolist()],
            }
        )
    try:  # a data error found on rank 0 must reach every rank instead of leaving them at a barrier
        build_datasets(make_cfg(f"{root}/does_not_exist"))
        error = None
    except DataError as e:
        error = str(e)
    calls = []

    def fails_on_rank0_only() -> str:
        calls.append(rank)
        if rank == 0:
            raise DataError("rank 0 found bad.bin")
        return "ok"

    try:  # rank 1 must not run the check at all: it gets rank 0's verdict
        rank0_first(fails_on_rank0_only)
        shared = None
    except DataError as e:
        shared = str(e)
    result = {
        "len": len(train),
        "valid_len": len(valid),
        "steps": steps,
        "error": error,
        "shared": shared,
        "calls": calls,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
