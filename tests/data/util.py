"""Tiny indexed datasets for the data tests, written with megatron-core's own builder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

EOD = 2


def write_dataset(
    prefix: str | Path,
    docs: Sequence[Sequence[int]],
    dtype: type = np.uint16,
    meta: dict | None = None,
) -> str:
    """``prefix.bin``/``.idx`` with one sequence per document, plus ``prefix.meta.json`` when given."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(list(doc), dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    if meta is not None:
        Path(prefix + ".meta.json").write_text(json.dumps(meta))
    return prefix


def random_docs(
    n: int, seed: int, vocab: int = 100, min_len: int = 3, max_len: int = 40, base: int = 4
) -> list[list[int]]:
    """``n`` documents of random ids in ``[base, vocab)``, each ending with EOD."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        docs.append([*rng.integers(base, vocab, size=length - 1).tolist(), EOD])
    return docs


class FakeTokenizer:
    """The attributes of ``tokenizer.Tokenizer`` the data layer reads, without a sentencepiece model."""

    bos_id, eod_id, pad_id = 1, EOD, 3

    def __init__(self, vocab_size: int = 100, fingerprint: str = "f" * 64):
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint


def make_cfg(
    train, valid=None, *, seq: int = 16, steps: int = 10, gbs: int = 8, mbs: int = 2, vocab: int = 100, **data
):
    """A Config with just the fields the data layer reads."""
    from bigtrain.config import Config

    cfg = Config()
    cfg.model.seq_length = seq
    cfg.model.vocab_size = vocab
    cfg.train.steps = steps
    cfg.train.global_batch_size = gbs
    cfg.train.micro_batch_size = mbs
    cfg.data.train = train
    cfg.data.valid = valid
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def blend_corpora(root: Path) -> tuple[str, str]:
    """A single-file corpus ``web/web`` and a three-shard corpus ``code/code_0000{0,1,2}`` of unequal sizes."""
    web = write_dataset(root / "web" / "web", random_docs(200, seed=0))
    for i in range(3):
        write_dataset(root / "code" / f"code_{i:05d}", random_docs(60 * (i + 1), seed=i + 1))
    return web, str(root / "code" / "code")


def write_sentence_dataset(prefix: str | Path, docs: Sequence[Sequence[Sequence[int]]]) -> str:
    """``prefix.bin``/``.idx`` with each document a run of sequences, one per sentence (the layout of
    ``tokenizer.preprocess --split-sentences``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        flat = [i for sentence in doc for i in sentence]
        builder.add_document(torch.tensor(flat, dtype=torch.int64), [len(s) for s in doc])
    builder.finalize(prefix + ".idx")
    return prefix


class FakeBertTokenizer(FakeTokenizer):
    """A bert tokenizer's ids (``tokenizer.train --bert-specials`` layout: unk 0, bos 1, eos 2, pad 3,
    [CLS] 4, [SEP] 5, [MASK] 6) over a large vocabulary whose pieces start a word (``▁``) at every id
    divisible by ``word_every``."""

    unk_id, eos_id, cls_id, sep_id, mask_id = 0, 2, 4, 5, 6

    def __init__(self, vocab_size: int = 100_000, word_every: int = 3):
        super().__init__(vocab_size)
        self.word_every = word_every

    def id_to_piece(self, i: int) -> str:
        return ("▁" if i % self.word_every == 0 else "") + f"p{i}"

    def missing_bert_specials(self) -> list[str]:
        return []
