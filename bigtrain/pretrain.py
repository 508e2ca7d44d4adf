"""``python -m bigtrain.pretrain --config FILE [--set key=value ...]``: the pretraining entry point.

Config errors are reported (one line, exit 2) before any process group is created, so a bad layout
never hangs a multi-node job.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bigtrain.config import Config, ConfigError, describe, load_config

if TYPE_CHECKING:  # annotations only: this module imports the rest of bigtrain where it is used
    from bigtrain.distributed import Dist
    from bigtrain.trainer import Trainer, TrainState

FINISHED = "finished.json"  # written into run_dir when train.steps are done
DataFactory = Callable[[Config, "Dist"], tuple[Callable[[int], Iterator], Callable[[], Iterator] | None]]
# (cfg, dist, engine, train batches, valid batches, state) -> the Trainer (or a subclass) that runs
TrainerFactory = Callable[
    [Config, "Dist", Any, Callable[[int], Iterator], "Callable[[], Iterator] | None", "TrainState"], "Trainer"
]


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
    from bigtrain.distributed import check_precision, world_size_from_env

    cfg = load_config(args.config, args.set)
    check_precision(cfg)  # the host cannot: DeepSpeed would refuse it only after start-up
    vocab = None
    if cfg.data.tokenizer and cfg.model.vocab_size is None:
        from tokenizer import Tokenizer, TokenizerError

        try:  # a tokenizer.train directory (tokenizer.model) or an imported model's tokenizer.json
            vocab = Tokenizer.load(cfg.data.tokenizer).vocab_size
        except (FileNotFoundError, TokenizerError) as e:
            raise ConfigError(f"data.tokenizer: {e}") from None
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


def default_data(cfg: Config, dist: Dist) -> tuple[Callable[[int], Iterator], Callable[[], Iterator] | None]:
    """Train/valid micro-batch iterators on megatron-core datasets (bigtrain.data)."""
    from bigtrain.data import batch_iterator, build_datasets
    from bigtrain.data.datasets import configured_tokenizer

    train_ds, valid_ds = build_datasets(cfg, configured_tokenizer(cfg))
    dp = cfg.derived.data_parallel_size
    t = cfg.train

    def train_batches(consumed: int) -> Iterator:
        return batch_iterator(train_ds, consumed, t.micro_batch_size, t.global_batch_size, dist.dp_rank, dp)

    def valid_batches() -> Iterator:
        return batch_iterator(valid_ds, 0, t.micro_batch_size, t.global_batch_size, dist.dp_rank, dp)

    return train_batches, (valid_batches if valid_ds is not None else None)


def rank0_decides_order(cfg: Config, saved: int, new: int, n: int) -> None:
    """Pre-flight's data-order comparison on ranks other than 0 (``resume_rules.reconcile``'s
    ``order_change``): before any process group, only rank 0 builds megatron's index maps (two processes
    must not write the same cache files), so the others take the order as kept. If rank 0 finds it
    changed, it refuses and exits 2 before the rendezvous, as for bad data, and the launch fails on every
    rank; if it agrees, all go on, and in :func:`run` every rank compares the orders again and takes rank
    0's answer (:func:`agreed_order_change`)."""
    return None


def agreed_order_change(cfg: Config, saved: int, new: int, n: int) -> int | None:
    """``resume_rules.reconcile``'s ``order_change`` in :func:`run`, where a process group exists: every
    rank builds both orders (``build_datasets`` is collective: megatron's rank-0-first protocol; the maps
    pre-flight cached on rank 0 are loaded) and rank 0's answer is broadcast, so every rank decides the
    same."""
    from bigtrain.checkpoint import _broadcast
    from bigtrain.resume_rules import built_order_change

    return _broadcast(built_order_change(cfg, saved, new, n))


def _saved(cfg: Config, tag: str) -> tuple[dict, Config]:
    from bigtrain.resume_rules import saved_config

    meta = json.loads((Path(cfg.train.run_dir) / "checkpoints" / tag / "bigtrain.json").read_text())
    return meta, saved_config(meta)


def resharding(cfg: Config, tag: str) -> bool:
    """Whether checkpoint ``tag`` of run_dir was saved at a layout whose optimizer state must be resharded
    into ``cfg``'s (:func:`bigtrain.reshard_inject.needs_reshard`)."""
    from bigtrain.reshard_inject import needs_reshard

    return needs_reshard(*_saved(cfg, tag), cfg)


def resharding_line(cfg: Config, tag: str) -> str:
    """:func:`bigtrain.reshard_inject.reshard_line` for checkpoint ``tag`` of run_dir."""
    from bigtrain.reshard_inject import reshard_line

    return reshard_line(tag, *_saved(cfg, tag), cfg)


def stages_with_nothing_to_train(cfg: Config) -> list[int]:
    """Pipeline stages whose layers the task's freezing leaves without a trainable parameter (DeepSpeed
    builds each stage's optimizer from its own parameters and refuses an empty list after start-up)."""
    from bigtrain.models import layout
    from bigtrain.registry import task_params
    from bigtrain.reshard import trainable_keys

    p, m = cfg.parallel, cfg.model
    if p.pipeline == 1:
        return []
    params = {lp.key: lp for lp in layout.iter_layer_params(m, task=task_params(cfg))}
    trained = {int(key.split(".", 1)[0]) for key in trainable_keys(cfg, params)}
    parts = layout.pipeline_parts(m, cfg.derived.padded_vocab_size, p.tensor, p.pipeline, p.partition_method)
    return [s for s in range(p.pipeline) if not trained & set(range(parts[s], parts[s + 1]))]


def preflight(cfg: Config, rank: int) -> None:
    """Mismatches that would otherwise surface after start-up (or never), as ConfigError, before any
    process group exists: a checkpoint whose model shape or layout differs from the config, a resume
    whose config changes what the checkpoint cannot follow (``resume_rules``), and (rank 0, the others
    wait for it at rendezvous) data that is missing, corrupt, out of the vocab or tokenized with another
    tokenizer, or a longer run whose data order would not continue the saved run's."""
    from bigtrain import checkpoint_files as files
    from bigtrain.checkpoint import model_shape_differences
    from bigtrain.config import config_from_dict
    from bigtrain.reshard_inject import needs_reshard, reshard_line
    from bigtrain.resume_rules import built_order_change, check_chat_template, reconcile, saved_config

    def saved_meta(ckpt: Path) -> dict:
        try:
            return json.loads((ckpt / files.META).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{ckpt / files.META}: unreadable checkpoint metadata ({e})") from None

    def check_shape(ckpt: Path, what: str) -> None:
        diffs = model_shape_differences(config_from_dict(saved_meta(ckpt)["config"]).model, cfg.model)
        if diffs:
            raise ConfigError(
                f"{what} {ckpt} has a different model shape than the config: " + "; ".join(diffs)
            )

    ckpt_dir = Path(cfg.train.run_dir) / "checkpoints"
    # the checkpoint a resume would start from (its metadata verified; checksums of the rest come later)
    complete = [
        t
        for t in files.candidate_tags(ckpt_dir)
        if not files.verify(ckpt_dir / t, select=lambda r: r == files.META)
    ]
    if complete:
        newest = ckpt_dir / complete[0]
        meta = saved_meta(newest)
        # every field: refused ones stop here (a layout change whose optimizer state cannot be resharded
        # among them); run() applies and says the honoured ones (a data order megatron must build to
        # compare: rank 0 decides, see rank0_decides_order)
        order_change = built_order_change if rank == 0 else rank0_decides_order
        reconcile(copy.deepcopy(cfg), meta, str(newest), order_change)
        check_chat_template(cfg, meta, str(newest))  # SFT: the template it was trained with
        if rank == 0 and needs_reshard(meta, saved_config(meta), cfg):
            print(reshard_line(newest.name, meta, saved_config(meta), cfg), flush=True)
    elif cfg.checkpoint.load:
        from bigtrain.checkpoint import resolve_weights_dir

        try:
            source = resolve_weights_dir(cfg.checkpoint.load)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"checkpoint.load: {e}") from None
        check_shape(source, "checkpoint.load:")
    idle = stages_with_nothing_to_train(cfg)
    if idle:
        raise ConfigError(
            f"parallel.pipeline={cfg.parallel.pipeline}: pipeline stage(s) {idle} would hold no trainable parameter "
            f"with this freezing (finetune.freeze_embeddings={cfg.finetune.freeze_embeddings}, "
            f"freeze_layers={cfg.finetune.freeze_layers}, lora.rank={cfg.finetune.lora.rank}); DeepSpeed needs "
            "some on every stage: freeze less, use fewer stages, or another parallel.partition_method"
        )
    if rank == 0 and not cfg.data.mock:
        from bigtrain.data import DataError, check_same_tokenizer, validate_data
        from bigtrain.data.datasets import configured_tokenizer

        tok = configured_tokenizer(cfg)
        try:
            corpora = [
                corpus
                for name in ("train", "valid")
                if getattr(cfg.data, name) is not None
                for corpus in validate_data(
                    getattr(cfg.data, name),
                    cfg.model.vocab_size,
                    tok,
                    cache_dir=cfg.data.cache_dir,
                    field=f"data.{name}",
                )
            ]
            check_same_tokenizer(corpora)  # train and valid too
        except DataError as e:
            raise ConfigError(str(e)) from None
        if cfg.model.family == "bert" and cfg.data.masking.sentence_pair != "none":
            for shard in (s for c in corpora for s in c.shards):
                if shard.meta is not None and shard.meta.get("split_sentences") is False:
                    raise ConfigError(
                        f"{shard.meta_file}: written without --split-sentences (one sequence per document), but "
                        f"data.masking.sentence_pair {cfg.data.masking.sentence_pair} pairs sentences: re-run "
                        "`python -m tokenizer.preprocess ... --split-sentences`, or set sentence_pair none"
                    )


def run(
    cfg: Config, data: DataFactory = default_data, trainer_cls: TrainerFactory | None = None
) -> TrainState:
    """Train per ``cfg``; resumes from the newest valid checkpoint in ``run_dir``. Returns the final state.

    ``trainer_cls`` (a :class:`bigtrain.trainer.Trainer` subclass with its own batch adapter and hooks)
    and ``build(cfg, topology) -> model`` let other tasks (fine-tuning) reuse start-up, resume and fault
    handling unchanged."""
    from bigtrain import checkpoint
    from bigtrain import checkpoint_files as files
    from bigtrain.distributed import init_distributed, shutdown
    from bigtrain.engine import initialize_engine
    from bigtrain.metrics import console
    from bigtrain.registry import build_model
    from bigtrain.trainer import Trainer, TrainState

    dist = init_distributed(cfg)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    announced = next(iter(files.candidate_tags(checkpoint.checkpoints_dir(cfg))), None)  # pre-flight's
    tag = checkpoint.choose_resume_tag(cfg, dist, refuse_none_valid=True)
    changes = checkpoint.compare_with_saved(cfg, tag, agreed_order_change) if tag is not None else []
    if tag is not None and tag != announced and dist.is_main and resharding(cfg, tag):
        console(f"{resharding_line(cfg, tag)} (after falling back from {announced})")
    if dist.is_main:  # after the comparison: what config.yaml records is what runs
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        console("bigtrain resolved config:\n" + cfg.to_yaml())
    model = build_model(cfg, topology=dist.topology)  # the family and task cfg names (bigtrain.registry)
    if dist.is_main and cfg.model.moe.num_experts:  # what MFU counts (bigtrain.flops) next to the total
        from bigtrain import flops

        vocab = cfg.derived.padded_vocab_size
        total, active = flops.num_parameters(cfg.model, vocab), flops.active_parameters(cfg.model, vocab)
        console(
            f"model: {total:,} parameters, {active:,} active per token (top-{cfg.model.moe.top_k} experts)"
        )
    if tag is not None and resharding(cfg, tag):  # the optimizer state follows after initialize
        checkpoint.load_weights_only(model, cfg, checkpoint.checkpoints_dir(cfg) / tag)
    if cfg.checkpoint.load and tag is None:
        checkpoint.load_weights_only(model, cfg, cfg.checkpoint.load)
        if dist.is_main:
            console(f"loaded weights from {cfg.checkpoint.load} (fresh optimizer, step 0)")
    engine = initialize_engine(cfg, model, dist)
    state, saved = TrainState(), None
    if tag is not None:
        saved = checkpoint.resume(engine, cfg, dist, tag)
        state = TrainState.from_saved(saved)
        if dist.is_main:
            console(f"resumed from step {state.step} ({state.consumed_samples} samples consumed) [{tag}]")
            for line in changes:  # honoured config changes (bigtrain.resume_rules), in effect from now
                console(line)
    train_batches, valid_batches = data(cfg, dist)
    trainer = (trainer_cls or Trainer)(cfg, dist, engine, train_batches, valid_batches, state)
    if tag is not None and saved is not None:
        trainer.adopt_checkpoint(tag, saved)
    state = trainer.train()
    if dist.is_main and trainer.finished:
        # for auto-resume loops: the run is complete, do not relaunch (launch/slurm.sbatch)
        (run_dir / FINISHED).write_text(json.dumps(state.as_dict()))
    shutdown()  # not on errors: tearing down groups with a dead peer can block (run_or_exit exits)
    return state


def run_or_exit(
    cfg: Config, data: DataFactory = default_data, trainer_cls: TrainerFactory | None = None
) -> None:
    """``run`` for entry points: a failure on this rank (a fault policy, a collective that timed out
    because a peer died or hangs, any error) is reported in one place and the process exits non-zero
    at once, instead of hanging in process-group teardown or in a prefetch thread."""
    import os
    import traceback

    from bigtrain.distributed import rank_from_env
    from bigtrain.reliability import TrainingError, exit_signals, register_with_launcher

    exit_signals(cfg.train.exit_signal_save)  # before the launcher can forward anything to this rank
    register_with_launcher(rank_from_env())
    try:
        preflight(cfg, rank_from_env())
    except ConfigError as e:
        print(f"bigtrain: config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        run(cfg, data=data, trainer_cls=trainer_cls)
    except ConfigError as e:  # the checkpoint resumed after a fallback differs from the pre-flight's
        print(f"bigtrain: config error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except TrainingError as e:
        print(f"bigtrain: rank {rank_from_env()}: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except BaseException as e:  # noqa: BLE001 - every failure must end the process
        traceback.print_exc()
        text = str(e).lower()
        hint = ""
        if "timed out" in text or "timeout" in text:
            hint = (
                f" (no reply within train.dist_timeout_minutes={cfg.train.dist_timeout_minutes:g}: "
                "a peer rank died or hangs)"
            )
        elif "connection" in text or "peer" in text or "broken pipe" in text:
            hint = " (a peer rank died)"
        print(
            f"bigtrain: rank {rank_from_env()}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            f"{hint}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    cfg = config_or_exit(parse_args(argv))
    run_or_exit(cfg)


if __name__ == "__main__":
    main()
