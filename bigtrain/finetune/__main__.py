"""``python -m bigtrain.finetune --config configs/sft-tiny.yaml [--set key=value ...] [--strict]``:
supervised fine-tuning (``finetune.task: sft``), text classification (``classify``; the bert family:
texts or text pairs) or word tagging (``token_classify``, the bert family), full or LoRA,
at any tensor x pipeline x data layout, starting from ``checkpoint.load`` (a bigtrain checkpoint or a
tools/convert_from_hf.py output). ``deepspeed launch/finetune.sh`` runs the same on every rank."""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bigtrain.config import Config
from bigtrain.finetune.data import DataError

if TYPE_CHECKING:
    import torch

    from bigtrain.distributed import Dist
    from bigtrain.pretrain import DataFactory


@dataclass
class Prepared:
    train: list  # items (packed sequences or examples) as dicts of tensors
    valid: list
    chat_template: dict | None = None  # sft: data.template_record, saved with every checkpoint


def prepare(cfg: Config, log: Callable[[str], None]) -> Prepared:
    """Read and tokenize the data (every rank, deterministically); sets ``finetune.labels`` for
    classification and ``train.steps`` from ``finetune.epochs``."""
    from bigtrain.finetune import data as d

    f, seq = cfg.finetune, cfg.model.seq_length
    record = None
    if not cfg.data.tokenizer:
        raise DataError("data.tokenizer: fine-tuning needs a tokenizer directory")
    if f.task == "sft":
        # the exported tokenizer files render and tokenize: what is trained is what the export serves
        chat = d.ChatTemplate(cfg.data.tokenizer)
        log(chat.describe())
        record = d.template_record(chat)

        def read(spec: Any, key: str) -> list[dict[str, torch.Tensor]]:
            examples, stats = d.read_sft(spec, key, chat, seq, f.overlong, f.strict)
            log(stats.summary(key))
            return d.pack(examples, seq, chat.pad_id, f.packing)

        train = read(f.train, "finetune.train")
        valid = read(f.valid, "finetune.valid") if f.valid is not None else []
        log(f"sft: {len(train)} training sequences of {seq} tokens (packing {'on' if f.packing else 'off'})")
    elif cfg.model.family == "bert":
        train, valid = _encoder_data(cfg, log)
    else:
        tok = d.hf_tokenizer(cfg.data.tokenizer)  # what the exported classifier is given
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        examples, stats, labels = d.read_classify(
            f.train, "finetune.train", tok, seq, f.overlong, f.strict, f.labels or None
        )
        log(stats.summary("finetune.train"))
        f.labels = labels
        train = [d.classify_item(ex, seq, pad) for ex in examples]
        valid = []
        if f.valid is not None:
            vexamples, vstats, _ = d.read_classify(
                f.valid, "finetune.valid", tok, seq, f.overlong, f.strict, labels
            )
            log(vstats.summary("finetune.valid"))
            valid = [d.classify_item(ex, seq, pad) for ex in vexamples]
        if len(labels) < 2:
            raise DataError(f"finetune.train: classification needs at least 2 labels, found {labels}")
        log(f"classify: {len(train)} training examples, labels {labels}")
    if not train:
        raise DataError("finetune.train: no usable example")
    if f.epochs:
        cfg.train.steps = math.ceil(f.epochs * len(train) / cfg.train.global_batch_size)
        log(f"finetune.epochs {f.epochs}: train.steps = {cfg.train.steps}")
    return Prepared(train, valid, record)


def _encoder_data(cfg: Config, log: Callable[[str], None]) -> tuple[list, list]:
    """The bert family's (train, valid) items: classify (texts or text pairs) or token_classify (tagged
    words), padded to ``model.seq_length``, not packed; sets ``finetune.labels``."""
    from bigtrain.finetune import data as d

    f, seq, tokenizer = cfg.finetune, cfg.model.seq_length, cfg.data.tokenizer
    if tokenizer is None:  # prepare checked it
        raise DataError("data.tokenizer: fine-tuning needs a tokenizer directory")
    if f.task not in ("classify", "token_classify"):
        raise DataError(f"finetune.task {f.task}: model.family bert fine-tunes classify|token_classify")
    tok = d.hf_tokenizer(tokenizer)
    specials = d.Specials.of(tokenizer)
    read = d.read_token_classify if f.task == "token_classify" else d.read_classify_pairs
    examples, stats, labels = read(
        f.train, "finetune.train", tok, specials, seq, f.overlong, f.strict, f.labels or None
    )
    log(stats.summary("finetune.train"))
    f.labels = labels
    train = [d.encoder_item(ex, seq, specials.pad) for ex in examples]
    valid = []
    if f.valid is not None:
        vexamples, vstats, _ = read(
            f.valid, "finetune.valid", tok, specials, seq, f.overlong, f.strict, labels
        )
        log(vstats.summary("finetune.valid"))
        valid = [d.encoder_item(ex, seq, specials.pad) for ex in vexamples]
    if len(labels) < 2:
        raise DataError(f"finetune.train: classification needs at least 2 labels, found {labels}")
    what = "tags" if f.task == "token_classify" else "labels"
    log(f"{f.task}: {len(train)} training examples, {what} {labels}")
    return train, valid


def data_factory(prepared: Prepared) -> DataFactory:
    from bigtrain.finetune import data as d

    def factory(cfg: Config, dist: Dist) -> tuple[Callable[[int], Iterator], Callable[[], Iterator] | None]:
        t, dp = cfg.train, cfg.derived.data_parallel_size
        valid = (
            d.valid_batches(prepared.valid, t.micro_batch_size, dist.dp_rank, dp) if prepared.valid else []
        )

        def train_batches(consumed: int) -> Iterator:
            return d.train_stream(
                prepared.train, consumed, t.micro_batch_size, t.global_batch_size, dist.dp_rank, dp, t.seed
            )

        return train_batches, (lambda: iter(valid)) if valid else None

    return factory


def main(argv: list[str] | None = None) -> None:
    from bigtrain.pretrain import config_or_exit, parse_args, run_or_exit

    argv = list(sys.argv[1:] if argv is None else argv)
    strict = "--strict" in argv
    argv = [a for a in argv if a != "--strict"]
    cfg = config_or_exit(parse_args(argv, __doc__))
    if cfg.finetune.task == "none":
        print(
            "bigtrain.finetune: config error: finetune.task must be sft|classify|token_classify",
            file=sys.stderr,
        )
        sys.exit(2)
    cfg.finetune.strict = cfg.finetune.strict or strict
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        prepared = prepare(cfg, lambda line: print(line, flush=True) if main_rank else None)
    except (DataError, FileNotFoundError) as e:
        print(f"bigtrain.finetune: data error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    from bigtrain.finetune.trainer import FinetuneTrainer

    # checkpoint.load (the base) goes through pretraining's weights-only load, which keeps the tensors
    # fine-tuning adds (adapters, head) at their initialization; resuming from run_dir works as there.
    run_or_exit(
        cfg,
        data=data_factory(prepared),
        trainer_cls=functools.partial(FinetuneTrainer, chat_template=prepared.chat_template),
    )


if __name__ == "__main__":
    main()
