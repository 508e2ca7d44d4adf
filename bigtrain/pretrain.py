"""``python -m bigtrain.pretrain --config FILE [--set key=value ...]``: the pretraining entry point.

Config errors are reported (one line, exit 2) before any process group is created, so a bad layout
never hangs a multi-node job.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from bigtrain.config import Config, ConfigError, describe, load_config

DataFactory = Callable[[Config, "Dist"], tuple[Callable[[int], Iterator], Callable[[], Iterator] | None]]  # noqa: F821


def parse_args(argv: list[str] | None = None, description: str = __doc__) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_and_resolve(args: argparse.Namespace) -> Config:
    """Config from file + overrides, vocab from the tokenizer, validated against the world size."""
    from bigtrain.distributed import world_size_from_env

    cfg = load_config(args.config, args.set)
    vocab = None
    if cfg.data.tokenizer and cfg.model.vocab_size is None:
        from tokenizer import Tokenizer

        tok_dir = Path(cfg.data.tokenizer)
        if not (tok_dir / "tokenizer.model").is_file():
            raise ConfigError(f"data.tokenizer: {tok_dir} has no tokenizer.model")
        vocab = Tokenizer.load(tok_dir).vocab_size
    return cfg.resolve(world_size_from_env(), vocab)


def config_or_exit(args: argparse.Namespace) -> Config:
    if args.help_config:
        print("\n".join(describe()))
        sys.exit(0)
    try:
        return load_and_resolve(args)
    except ConfigError as e:
        print(f"bigtrain: config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_data(cfg: Config, dist) -> tuple[Callable[[int], Iterator], Callable[[], Iterator] | None]:
    """Train/valid micro-batch iterators on megatron-core datasets (bigtrain.data)."""
    from bigtrain.data import batch_iterator, build_datasets

    tok = None
    if cfg.data.tokenizer:
        from tokenizer import Tokenizer

        tok = Tokenizer.load(cfg.data.tokenizer)
    train_ds, valid_ds = build_datasets(cfg, tok)
    dp = cfg.derived.data_parallel_size
    t = cfg.train

    def train_batches(consumed: int) -> Iterator:
        return batch_iterator(train_ds, consumed, t.micro_batch_size, t.global_batch_size, dist.dp_rank, dp)

    def valid_batches() -> Iterator:
        return batch_iterator(valid_ds, 0, t.micro_batch_size, t.global_batch_size, dist.dp_rank, dp)

    return train_batches, (valid_batches if valid_ds is not None else None)


def run(cfg: Config, data: DataFactory = default_data, trainer_cls=None, build=None):
    """Train per ``cfg``; resumes from ``run_dir`` when it has a checkpoint. Returns the final state.

    ``trainer_cls`` (a :class:`bigtrain.trainer.Trainer` subclass) and ``build(cfg, topology) -> model``
    let other tasks (fine-tuning) reuse start-up, resume and fault handling unchanged."""
    from bigtrain import checkpoint
    from bigtrain.distributed import init_distributed, shutdown
    from bigtrain.engine import initialize_engine
    from bigtrain.metrics import console
    from bigtrain.models.parallelize import build_model
    from bigtrain.trainer import Trainer, TrainState

    dist = init_distributed(cfg)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        console("bigtrain resolved config:\n" + cfg.to_yaml())
    model = (build or build_model)(cfg, topology=dist.topology)
    resuming = checkpoint.latest_tag(checkpoint.checkpoints_dir(cfg)) is not None
    if cfg.checkpoint.load and not resuming:
        checkpoint.load_weights_only(model, cfg, cfg.checkpoint.load)
        if dist.is_main:
            console(f"loaded weights from {cfg.checkpoint.load} (fresh optimizer, step 0)")
    engine = initialize_engine(cfg, model, dist)
    state = TrainState()
    saved = checkpoint.resume(engine, cfg, dist)
    if saved is not None:
        state = TrainState(step=saved["step"], consumed_samples=saved["consumed_samples"])
        if dist.is_main:
            console(f"resumed from step {state.step} ({state.consumed_samples} samples consumed)")
    train_batches, valid_batches = data(cfg, dist)
    trainer = (trainer_cls or Trainer)(cfg, dist, engine, train_batches, valid_batches, state)
    try:
        return trainer.train()
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> None:
    cfg = config_or_exit(parse_args(argv))
    run(cfg)


if __name__ == "__main__":
    main()
