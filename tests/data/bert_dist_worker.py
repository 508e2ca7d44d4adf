"""One rank of the 2-process gloo test of the bert samples: build them (megatron's rank-0-first build
and cache), read this rank's slices of each global batch, report them as JSON.

Run as ``python -m tests.data.bert_dist_worker PREFIX CACHE_DIR OUT_DIR`` with RANK/WORLD_SIZE/MASTER_*.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch

from bigtrain.data import batch_iterator, build_datasets
from tests.data.util import FakeBertTokenizer, make_cfg

STEPS, GBS, MBS = 3, 8, 2
KEYS = ("tokens", "labels", "loss_mask", "token_types", "attention_mask", "nsp_labels", "sample_ids")


def bert_dist_cfg(prefix: str, cache: str):
    cfg = make_cfg(
        prefix, seq=48, steps=STEPS, gbs=GBS, mbs=MBS, vocab=100_000, split="90,10,0", cache_dir=cache
    )
    cfg.model.family = "bert"
    cfg.data.masking.whole_word = True
    return cfg


def main() -> None:
    torch.set_num_threads(1)
    prefix, cache, out = sys.argv[1:4]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    train, _ = build_datasets(bert_dist_cfg(prefix, cache), FakeBertTokenizer())
    it = batch_iterator(train, 0, MBS, GBS, rank, world, prefetch=0)
    batches = [{k: v.tolist() for k, v in next(it).items()} for _ in range(STEPS * GBS // (MBS * world))]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"len": len(train), "batches": batches}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
