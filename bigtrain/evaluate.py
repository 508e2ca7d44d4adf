"""``python -m bigtrain.evaluate --config FILE --data PREFIX [--set ...]``: mean next-token loss and
perplexity of a checkpoint over contiguous, non-overlapping ``seq_length + 1``-token windows of a
dataset, in order. Any tensor/pipeline/data layout; weights come from ``checkpoint.load`` or the
latest checkpoint of ``train.run_dir``. The last line printed is a JSON object.
"""

from __future__ import annotations

import json
import math
import sys

import torch

from bigtrain.config import Config
from bigtrain.distributed import rank_from_env
from bigtrain.pretrain import config_or_exit, parse_args


def _window_batch(window: dict, device: torch.device, real: bool) -> dict[str, torch.Tensor]:
    tokens = torch.as_tensor(window["tokens"]).long().view(1, -1).to(device)
    labels = torch.as_tensor(window["labels"]).long().view(1, -1).to(device)
    mask = (
        torch.ones_like(tokens, dtype=torch.float32)
        if real
        else torch.zeros_like(tokens, dtype=torch.float32)
    )
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


@torch.no_grad()
def evaluate(cfg: Config, data_path: str) -> dict[str, float]:
    """Mean loss over every window (each window's last seq_length tokens are predicted).

    Raises DataError (naming the file) for data training would refuse, before any process group exists.
    """
    from bigtrain import checkpoint
    from bigtrain.data import SequentialWindows
    from bigtrain.distributed import init_distributed, shutdown
    from bigtrain.registry import build_model
    from bigtrain.step_runner import LM_BATCH, GlobalBatch, make_eval_runner

    # One window per data-parallel rank per step: the layout never changes which windows count.
    cfg.train.micro_batch_size = 1
    cfg.train.global_batch_size = cfg.derived.data_parallel_size
    cfg.derived.grad_accum_steps = 1
    # Before any process group: the checks training runs (ids within the vocabulary, an integer dtype
    # wide enough for it, and with data.tokenizer, data tokenized by that tokenizer).
    tok = None
    if cfg.data.tokenizer:
        from tokenizer import Tokenizer

        tok = Tokenizer.load(cfg.data.tokenizer)
    windows = SequentialWindows(data_path, cfg.model.seq_length, cfg.model.vocab_size, tok)
    dist = init_distributed(cfg)
    try:
        model = build_model(cfg, topology=dist.topology)
        source = cfg.checkpoint.load or str(checkpoint.checkpoints_dir(cfg))
        checkpoint.load_weights_only(model, cfg, source)
        runner = make_eval_runner(cfg, model, dist, LM_BATCH)
        dp, dp_rank = cfg.derived.data_parallel_size, dist.dp_rank
        n = len(windows)
        steps = math.ceil(n / dp)
        total = torch.zeros((), dtype=torch.float64)
        for step in range(steps):
            index = step * dp + dp_rank
            real = index < n
            batch = _window_batch(windows[min(index, n - 1)], dist.device, real)
            tokens = batch["loss_mask"].sum()
            # normalizer None: each window's own mean; a padding window (no trained token) counts 0
            total += runner.run(GlobalBatch([batch], tokens, None), train=False) * dp  # DP mean -> sum
        mean = float(total) / n
        return {"loss": mean, "perplexity": math.exp(mean), "windows": n, "tokens": n * cfg.model.seq_length}
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    data = None
    if "--data" in argv:
        i = argv.index("--data")
        data = argv[i + 1] if i + 1 < len(argv) else None
        del argv[i : i + 2]
    if not data:
        print("bigtrain.evaluate: --data PREFIX is required", file=sys.stderr)
        sys.exit(2)
    cfg = config_or_exit(parse_args(argv, description=__doc__))
    from bigtrain.data import DataError

    try:
        result = evaluate(cfg, data)
    except DataError as e:
        print(f"bigtrain.evaluate: data error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if rank_from_env() == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
