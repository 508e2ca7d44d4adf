"""``python -m tests.activation_worker OUT_DIR RUNS_JSON`` with RANK/WORLD_SIZE/MASTER_ADDR set: one rank of
the per-rank activation measurement (tests/test_planner.py). ``RUNS_JSON``: ``{name: {"port": P, "config":
PATH, "set": [overrides...]}}``; each run initializes bigtrain's process groups on its own port
(``bigtrain.distributed.init_distributed``), builds this rank's model as training does
(``bigtrain.registry.build_model``), feeds it this rank's part of one fixed micro-batch and records the bytes
autograd saves (``bigtrain.memory.saved_activation_bytes``, parameters excluded), then tears the groups
down for the next run. Tensor ranks see the whole sequence; context ranks their contiguous
``seq_length / context`` chunk of tokens, labels and loss mask, as training cuts them
(``bigtrain.step_runner.to_device``). Each rank writes ``OUT_DIR/rank{R}.json``: ``{name: saved bytes}``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def measure(config: str, overrides: list[str]) -> int:
    from bigtrain.config import load_config, torch_dtype
    from bigtrain.distributed import init_distributed, shutdown
    from bigtrain.memory import saved_activation_bytes
    from bigtrain.registry import build_model
    from bigtrain.step_runner import to_device

    cfg = load_config(config, overrides).resolve(int(os.environ["WORLD_SIZE"]))
    dist = init_distributed(cfg)
    try:
        # in the training precision, as DeepSpeed casts it (bf16: the activations are bf16)
        model = build_model(cfg, topology=dist.topology).to(torch_dtype(cfg.precision))
        b, s = cfg.train.micro_batch_size, cfg.model.seq_length
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


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    out_dir, runs_json = argv
    rank = int(os.environ["RANK"])
    result = {}
    for name, run in json.loads(Path(runs_json).read_text()).items():
        os.environ["MASTER_PORT"] = str(run["port"])
        result[name] = measure(run["config"], run["set"])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
