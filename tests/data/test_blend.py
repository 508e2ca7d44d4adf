"""Building train/valid streams: the realized blend mix, data name forms, index-cache reuse, mock data."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from bigtrain.data import DataError, build_datasets, num_evaluations, resolve_corpus
from tests.data.util import blend_corpora, make_cfg, random_docs, write_dataset


def test_blend_mix_matches_weights_over_10000_samples(tmp_path):
    web, code = blend_corpora(tmp_path)
    cfg = make_cfg([[0.7, web], [0.3, code]], steps=1250, gbs=8)
    train, valid = build_datasets(cfg)
    assert len(train) >= 10_000 and valid is not None
    shard_counts = collections.Counter()
    corpus_counts = collections.Counter()
    blended = train.dataset
    for i in range(10_000):
        dataset_id = int(blended.dataset_index[i])
        shard_counts[dataset_id] += 1
        corpus_counts[train.corpus_of_dataset[dataset_id]] += 1
    assert abs(corpus_counts[0] / 10_000 - 0.7) < 0.02, corpus_counts
    assert abs(corpus_counts[1] / 10_000 - 0.3) < 0.02, corpus_counts
    # Within the sharded corpus, each shard's share follows its size (1:2:3 documents, similar lengths).
    sizes = np.array([s.num_tokens for s in train.corpora[1].shards], dtype=float)
    realized = np.array([shard_counts[1 + k] for k in range(3)], dtype=float)
    np.testing.assert_allclose(realized / realized.sum(), sizes / sizes.sum(), atol=0.02)
    # Items agree with the index: corpus_id comes from the blend member the sample was drawn from.
    expected = [train.corpus_of_dataset[int(blended.dataset_index[i])] for i in range(50)]
    assert [train[i]["corpus_id"] for i in range(50)] == expected


def test_items_are_fixed_windows_shifted_by_one(tmp_path):
    web, _ = blend_corpora(tmp_path)
    train, _ = build_datasets(make_cfg(web, seq=16))
    item = train[3]
    assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (16,)
    assert item["sample_id"] == 3
    assert item["tokens"][1:].tolist() == item["labels"][:-1].tolist()
    assert item["loss_mask"].tolist() == [1.0] * 16


def test_name_forms_resolve_to_the_same_shards(tmp_path):
    _, code = blend_corpora(tmp_path)
    shards = [str(tmp_path / "code" / f"code_{i:05d}") for i in range(3)]
    assert resolve_corpus(code) == shards  # prefix of a shard set
    assert resolve_corpus(str(tmp_path / "code")) == shards  # directory
    assert resolve_corpus(str(tmp_path / "code" / "code_*")) == shards  # glob of prefixes
    assert resolve_corpus(str(tmp_path / "code" / "*.idx")) == shards  # glob of files
    assert resolve_corpus(shards[1]) == [shards[1]]  # one shard by its own prefix
    with pytest.raises(DataError, match="nothing"):
        resolve_corpus(str(tmp_path / "nothing"))
    for n in (10, 2):  # numbers without zero padding still sort as numbers
        write_dataset(tmp_path / "num" / f"part_{n}", random_docs(2, seed=n))
    assert resolve_corpus(str(tmp_path / "num")) == [str(tmp_path / "num" / f"part_{n}") for n in (2, 10)]


def test_sharded_corpus_is_one_corpus_and_valid_corpus_is_separate(tmp_path):
    web, code = blend_corpora(tmp_path)
    train, valid = build_datasets(make_cfg(str(tmp_path / "code"), valid=web, steps=20))
    assert len(train.corpora) == 1 and len(train.corpora[0].shards) == 3
    assert {train[i]["corpus_id"] for i in range(len(train))} == {0}
    assert len(train) >= 20 * 8
    assert len(valid) >= num_evaluations(make_cfg(web).train) * 2 * 8
    assert [s.prefix for c in valid.corpora for s in c.shards] == [web]


def test_valid_samples_cover_every_evaluation(tmp_path):
    web, _ = blend_corpora(tmp_path)
    cfg = make_cfg(web, steps=25, gbs=8)
    cfg.train.eval_interval, cfg.train.eval_steps = 10, 3
    assert num_evaluations(cfg.train) == 3  # steps 10, 20 and the final 25
    _, valid = build_datasets(cfg)
    assert len(valid) >= 3 * 3 * 8


def test_split_too_fine_for_a_shard_is_an_error(tmp_path):
    small = write_dataset(tmp_path / "small", random_docs(10, seed=3))
    with pytest.raises(DataError, match=f"{small}: 10 documents are too few"):
        build_datasets(make_cfg(small, split="98,2,0"))


def _counting(monkeypatch, module, name: str) -> list[int]:
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("use_cache_dir", [False, True])
def test_second_build_reuses_index_cache(tmp_path, monkeypatch, use_cache_dir):
    from megatron.core.datasets import helpers

    from bigtrain.data import validate

    web, code = blend_corpora(tmp_path / "data")
    cache_dir = str(tmp_path / "cache") if use_cache_dir else None
    cfg = make_cfg([[0.7, web], [0.3, code]], cache_dir=cache_dir)
    sample_maps = _counting(monkeypatch, helpers, "build_sample_idx")
    blends = _counting(monkeypatch, helpers, "build_blending_indices")
    scans = _counting(monkeypatch, validate, "scan_token_range")

    first, _ = build_datasets(cfg)
    cache_root = cache_dir or str(tmp_path / "data" / "web" / "cache")
    (entry,) = os.listdir(os.path.join(cache_root, "index"))  # one entry for these files
    expected_dir = os.path.join(cache_root, "index", entry)
    files = {
        f: os.stat(os.path.join(expected_dir, f)).st_mtime_ns
        for f in os.listdir(expected_dir)
        if f.endswith(".npy")
    }
    assert len(sample_maps) == 8 and len(blends) == 2 and len(scans) == 4  # each of the 4 shards scanned once
    assert files
    if use_cache_dir:
        assert not os.path.exists(tmp_path / "data" / "web" / "cache")

    second, _ = build_datasets(cfg)
    assert len(sample_maps) == 8 and len(blends) == 2 and len(scans) == 4  # nothing rebuilt or rescanned
    assert {f: os.stat(os.path.join(expected_dir, f)).st_mtime_ns for f in files} == files
    assert [second[i]["tokens"].tolist() for i in range(20)] == [
        first[i]["tokens"].tolist() for i in range(20)
    ]

    cfg.train.seed += 1  # a different shuffle is a different cache entry
    build_datasets(cfg)
    assert len(sample_maps) == 16 and len(blends) == 4 and len(scans) == 4


def test_mock_data(tmp_path):
    cfg = make_cfg(None, mock=True, vocab=50, seq=32)
    train, valid = build_datasets(cfg)
    assert len(train) >= 10 * 8 and valid is not None
    item = train[0]
    assert item["tokens"].shape == (32,)
    assert int(item["tokens"].max()) < 50 and int(item["labels"].max()) < 50


def test_rewritten_data_never_meets_the_old_index_maps(tmp_path):
    """Files replaced under the same names by another tool (no bigtrain metadata, so no preprocess
    cleanup): a prefix with more documents, and a shard set that shrank. The next build in the same
    data.cache_dir equals a build in an empty one, sample for sample."""
    single = write_dataset(tmp_path / "data" / "single", random_docs(40, seed=5))
    shards = [write_dataset(tmp_path / "data" / f"set_{i:05d}", random_docs(50, seed=i)) for i in range(3)]
    names = [single, str(tmp_path / "data" / "set")]

    def samples(name: str, cache: str) -> list[list[list[int]]]:
        cfg = make_cfg(name, cache_dir=str(tmp_path / cache), split="80,20,0")
        return [[ds[i]["tokens"].tolist() for i in range(len(ds))] for ds in build_datasets(cfg)]

    before = [samples(name, "cache") for name in names]
    write_dataset(single, random_docs(200, seed=6))
    for ext in (".bin", ".idx"):
        os.remove(shards[2] + ext)
    write_dataset(shards[1], random_docs(20, seed=7))
    for name, old in zip(names, before):
        after = samples(name, "cache")
        assert after == samples(name, "fresh") and len(after[0]) != len(old[0])
    assert len(os.listdir(tmp_path / "cache" / "index")) == 4  # one entry per set of files
