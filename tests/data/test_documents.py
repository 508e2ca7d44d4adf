"""``data.document_mask``: per-document positions (megatron-core's ``reset_position_ids``) and document
ids on GPT samples, long (32k-token) samples, and corpora too small for one sample."""

from __future__ import annotations

import pytest
import torch

from bigtrain.data import DataError, build_datasets
from bigtrain.data.datasets import document_ids
from bigtrain.data.sampler import collate
from tests.data.util import EOD, FakeTokenizer, make_cfg, random_docs, write_dataset


def test_document_ids_follow_position_restarts():
    # a sample starting mid-document: its tail is document 0, the EOD ends (and belongs to) it
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 2, 3])
    assert document_ids(positions).tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]
    assert document_ids(positions[None].repeat(2, 1)).shape == (2, 10)  # batched [b, s]
    with pytest.raises(ValueError, match="start at 0"):
        document_ids(torch.tensor([3, 4, 0]))


def _expected(tokens: list[int]) -> tuple[list[int], list[int]]:
    """Positions and document ids by the definition: a document ends with (and includes) its EOD."""
    doc, pos, docs, positions = 0, 0, [], []
    for t in tokens:
        docs.append(doc)
        positions.append(pos)
        pos += 1
        if t == EOD:
            doc, pos = doc + 1, 0
    return positions, docs


def test_samples_carry_positions_and_doc_ids_split_at_eods(tmp_path):
    prefix = write_dataset(tmp_path / "c", random_docs(300, seed=3, min_len=2, max_len=12))
    cfg = make_cfg(prefix, seq=64, steps=4, gbs=8, split="100,0,0", document_mask=True)
    train, _ = build_datasets(cfg, FakeTokenizer())
    plain, _ = build_datasets(make_cfg(prefix, seq=64, steps=4, gbs=8, split="100,0,0"), FakeTokenizer())
    mid_document = 0
    for i in range(len(train)):
        item = train[i]
        tokens = item["tokens"].tolist()
        positions, docs = _expected(tokens)
        assert item["positions"].tolist() == positions, i
        assert item["doc_ids"].tolist() == docs, i
        assert item["position_ids"].tolist() == positions
        # the option changes no token, label or loss weight
        assert torch.equal(item["tokens"], plain[i]["tokens"]) and torch.equal(
            item["labels"], plain[i]["labels"]
        )
        assert torch.equal(item["loss_mask"], plain[i]["loss_mask"])
        assert "doc_ids" not in plain[i] and "positions" not in plain[i]
        # every EOD is the last token of its document; the next token starts the next one at position 0
        for j, t in enumerate(tokens[:-1]):
            if t == EOD:
                assert docs[j + 1] == docs[j] + 1 and positions[j + 1] == 0
        gpt = train.dataset  # one shard: megatron's GPTDataset itself; where the sample starts in its doc
        if int(gpt.sample_index[gpt.shuffle_index[i]][1]) > 0:
            mid_document += 1  # the cut document's tail is document 0, its positions from 0 (as Megatron)
            assert docs[0] == 0 and positions[0] == 0
    assert mid_document > len(train) // 2
    batch = collate([train[0], train[1]])
    assert batch["positions"].shape == batch["doc_ids"].shape == (2, 64)
    assert batch["doc_ids"].dtype == batch["positions"].dtype == torch.long


def test_32k_token_samples_build_and_read(tmp_path):
    """A sample of 32768 + 1 tokens from a small corpus: megatron's index maps, sample sizes, reading."""
    seq = 32768
    prefix = write_dataset(tmp_path / "c", random_docs(1200, seed=1, min_len=20, max_len=100))
    cfg = make_cfg(
        prefix,
        seq=seq,
        steps=2,
        gbs=2,
        mbs=1,
        split="100,0,0",
        document_mask=True,
        cache_dir=str(tmp_path / "x"),
    )
    train, _ = build_datasets(cfg, FakeTokenizer())
    assert len(train) == 4  # train.steps * global_batch_size; ~72k tokens: two epochs of the documents
    for i in (0, len(train) - 1):
        item = train[i]
        assert item["tokens"].shape == item["labels"].shape == item["doc_ids"].shape == (seq,)
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])
        positions, docs = _expected(item["tokens"].tolist())
        assert item["positions"].tolist() == positions and item["doc_ids"].tolist() == docs
        assert int(item["doc_ids"].max()) > 300  # hundreds of documents packed in one sample
    again, _ = build_datasets(cfg, FakeTokenizer())  # from megatron's cached index maps
    assert torch.equal(again[len(train) - 1]["tokens"], train[len(train) - 1]["tokens"])


def test_corpus_smaller_than_one_sample_is_an_error(tmp_path):
    prefix = write_dataset(tmp_path / "small", random_docs(10, seed=0, min_len=20, max_len=40))
    cfg = make_cfg(prefix, seq=32768, steps=2, gbs=2, mbs=1, split="100,0,0", document_mask=True)
    with pytest.raises(DataError, match=r"small: its train part holds \d+ tokens, fewer than one sample of "):
        build_datasets(cfg, FakeTokenizer())
    # the same corpus at a length it covers builds
    train, _ = build_datasets(
        make_cfg(prefix, seq=64, steps=2, gbs=2, mbs=1, split="100,0,0"), FakeTokenizer()
    )
    assert train[0]["tokens"].shape == (64,)
