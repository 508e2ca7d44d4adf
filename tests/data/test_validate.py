"""Every data problem stops the run before training, as one line that names the offending file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bigtrain.data import DataError, build_datasets, validate_data
from bigtrain.data import validate as validate_module
from tests.data.util import FakeTokenizer, make_cfg, random_docs, write_dataset

META = {"tokenizer_fingerprint": "f" * 64, "vocab_size": 100, "dtype": "uint16"}


def _good(tmp_path, name="good"):
    return write_dataset(tmp_path / name, random_docs(30, seed=1), meta=META)


def _id_too_large(tmp_path):
    prefix = write_dataset(tmp_path / "big", [[5, 6, 2], [7, 150, 2]], meta=META)
    return prefix, {"vocab_size": 100}, prefix + ".bin"


def _uint16_for_large_vocab(tmp_path):
    prefix = _good(tmp_path)
    return prefix, {"vocab_size": 70_000}, prefix + ".idx"


def _too_narrow(dtype, vocab_size):
    def make(tmp_path):
        prefix = write_dataset(tmp_path / "narrow", random_docs(30, seed=1), dtype=dtype)
        return prefix, {"vocab_size": vocab_size}, prefix + ".idx"

    return make


def _float_tokens(tmp_path):
    prefix = write_dataset(tmp_path / "float", random_docs(30, seed=1), dtype=np.float32)
    return prefix, {}, prefix + ".idx"


def _other_tokenizer(tmp_path):
    prefix = _good(tmp_path)
    return prefix, {"tokenizer": FakeTokenizer(fingerprint="0" * 64)}, prefix + ".meta.json"


def _missing_bin(tmp_path):
    prefix = _good(tmp_path)
    os.remove(prefix + ".bin")
    return prefix, {}, prefix + ".bin"


def _missing_idx(tmp_path):
    prefix = _good(tmp_path)
    os.remove(prefix + ".idx")
    return prefix, {}, prefix + ".idx"


def _damaged(ext: str, damage):
    """A case: a good dataset whose ``ext`` file is then damaged in place by ``damage(file, size)``."""

    def make(tmp_path):
        prefix = _good(tmp_path)
        path = prefix + ext
        with open(path, "r+b") as f:
            damage(f, os.path.getsize(path))
        return prefix, {}, path

    return make


_truncated_idx = _damaged(".idx", lambda f, size: f.truncate(size - 9))
_header_only_idx = _damaged(".idx", lambda f, size: f.truncate(20))
_wrong_magic = _damaged(".idx", lambda f, size: f.write(b"NOTANIDX!"))
_truncated_bin = _damaged(".bin", lambda f, size: f.truncate(size - 2))


def _empty_corpus(tmp_path):
    prefix = write_dataset(tmp_path / "empty", [], meta=META)
    return prefix, {}, prefix + ".bin"


def _shard_set(tmp_path):
    """Three shards and one ``set.meta.json`` listing them, as tokenizer.preprocess writes a sharded set."""
    shards = []
    for i in range(3):
        docs = random_docs(10, seed=i)
        shards.append({"prefix": f"set_{i:05d}", "documents": 10, "tokens": sum(map(len, docs))})
        write_dataset(tmp_path / f"set_{i:05d}", docs)
    (tmp_path / "set.meta.json").write_text(json.dumps({**META, "shards": shards}))
    return str(tmp_path / "set")


def _lost_shard(tmp_path):
    prefix = _shard_set(tmp_path)
    for ext in (".bin", ".idx"):
        os.remove(f"{prefix}_00001{ext}")
    return prefix, {}, f"{prefix}_00001.bin"


def _stale_shard(tmp_path):
    prefix = _shard_set(tmp_path)
    write_dataset(f"{prefix}_00002", random_docs(11, seed=99))
    return prefix, {}, f"{prefix}_00002.bin"


def _zero_weight(tmp_path):
    prefix = _good(tmp_path)
    return [[0.7, _good(tmp_path, "other")], [0, prefix]], {}, prefix


def _negative_weight(tmp_path):
    prefix = _good(tmp_path)
    return [[-0.3, prefix]], {}, prefix


CASES = {
    "token id >= vocab": (_id_too_large, "outside the vocabulary"),
    "uint16 file, vocab needs int32": (_uint16_for_large_vocab, "uint16 cannot hold ids up to 69999"),
    "uint8 file, vocab 300": (_too_narrow(np.uint8, 300), "uint8 cannot hold ids up to 299"),
    "int16 file, vocab 40000": (_too_narrow(np.int16, 40_000), "int16 cannot hold ids up to 39999"),
    "float32 tokens": (_float_tokens, "float32 is not an integer type"),
    "different tokenizer": (_other_tokenizer, "different tokenizer"),
    "missing .bin": (_missing_bin, "missing"),
    "missing .idx": (_missing_idx, "missing"),
    "truncated .idx": (_truncated_idx, "corrupt index"),
    "header-only .idx": (_header_only_idx, "corrupt index"),
    "wrong magic": (_wrong_magic, "wrong magic"),
    "truncated .bin": (_truncated_bin, "truncated or mismatched"),
    "empty corpus": (_empty_corpus, "is empty"),
    "shard listed in meta but gone": (_lost_shard, "missing (listed as a shard"),
    "shard from another run": (_stale_shard, "records"),
    "zero blend weight": (_zero_weight, "must be > 0"),
    "negative blend weight": (_negative_weight, "must be > 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_error_names_the_file(tmp_path, case):
    make, phrase = CASES[case]
    data, kwargs, culprit = make(tmp_path)
    with pytest.raises(DataError) as err:
        validate_data(data, **kwargs)
    message = str(err.value)
    assert culprit in message and phrase in message, message
    assert "\n" not in message


def test_good_data_passes_and_reports_shards(tmp_path):
    prefix = _good(tmp_path)
    (corpus,) = validate_data(prefix, tokenizer=FakeTokenizer())
    (shard,) = corpus.shards
    assert shard.prefix == prefix and shard.dtype == np.uint16 and shard.num_docs == 30
    assert shard.max_id < 100 and shard.min_id >= 2
    assert shard.meta == META


def test_complete_shard_set_passes(tmp_path):
    prefix = _shard_set(tmp_path)
    (corpus,) = validate_data(prefix, vocab_size=100)
    assert [os.path.basename(s.prefix) for s in corpus.shards] == ["set_00000", "set_00001", "set_00002"]
    assert all(s.meta_file == prefix + ".meta.json" for s in corpus.shards)


def test_build_datasets_validates_before_building(tmp_path, monkeypatch):
    from megatron.core.datasets import helpers

    prefix, _, culprit = _id_too_large(tmp_path)
    monkeypatch.setattr(helpers, "build_sample_idx", lambda *a, **k: pytest.fail("built before validating"))
    with pytest.raises(DataError, match=culprit):
        build_datasets(make_cfg(prefix, vocab=100))
    good = _good(tmp_path)
    with pytest.raises(DataError, match=f"{good}.meta.json: data was tokenized with a different tokenizer"):
        build_datasets(make_cfg(good), tokenizer=FakeTokenizer(fingerprint="1" * 64))


def test_token_range_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    scans = []
    original = validate_module.scan_token_range
    monkeypatch.setattr(validate_module, "scan_token_range", lambda *a: scans.append(a) or original(*a))
    prefix = _good(tmp_path)
    validate_data(prefix, vocab_size=100)
    validate_data(prefix, vocab_size=100)
    assert len(scans) == 1
    stats = os.listdir(tmp_path / "cache" / "token_stats")
    assert (
        len(stats) == 1
        and json.loads((tmp_path / "cache" / "token_stats" / stats[0]).read_text())["max_id"] < 100
    )
    # Same size, new content (an out-of-range id): the file key changes, so the cached range is not trusted.
    with open(prefix + ".bin", "r+b") as f:
        f.write(np.array([150], dtype=np.uint16).tobytes())
    os.utime(prefix + ".bin", ns=(10**9, 10**9))
    with pytest.raises(DataError, match="token id 150"):
        validate_data(prefix, vocab_size=100)
    assert len(scans) == 2


@pytest.mark.parametrize(
    "dtype, vocab_size",
    [(np.int32, 512), (np.int64, 512), (np.uint8, 256), (np.int16, 32_768), (np.uint16, 65_536)],
)
def test_any_integer_dtype_wide_enough_is_read_like_uint16(tmp_path, dtype, vocab_size):
    """Issue 12 §5: int32 data for a 512-token vocabulary (megatron-core's builder default) trains;
    one rule (an integer dtype holding vocab_size - 1) for training, validation and evaluation."""
    from bigtrain.data import SequentialWindows

    docs = random_docs(40, seed=3, vocab=min(vocab_size, 250))
    reference = write_dataset(tmp_path / "ref", docs, dtype=np.uint16)
    prefix = write_dataset(tmp_path / "wide", docs, dtype=dtype)
    (corpus,) = validate_data(prefix, vocab_size=vocab_size)
    assert corpus.shards[0].dtype == dtype and corpus.shards[0].max_id == max(map(max, docs))
    got, want = (build_datasets(make_cfg(p, vocab=vocab_size))[0] for p in (prefix, reference))
    assert len(got) == len(want) > 0
    for i in range(len(want)):
        assert got[i]["tokens"].tolist() == want[i]["tokens"].tolist()
        assert got[i]["tokens"].dtype == want[i]["tokens"].dtype
    got, want = (SequentialWindows(p, 16, vocab_size=vocab_size) for p in (prefix, reference))
    assert [w["labels"].tolist() for w in got] == [w["labels"].tolist() for w in want]


def test_pretrain_and_evaluate_apply_one_dtype_rule(tmp_path, capsys):
    """What `bigtrain.pretrain` runs before any process group refused int32 data for vocab 512 (which
    `bigtrain.evaluate` read); both now accept it and refuse a too-narrow dtype naming the file."""
    from bigtrain import evaluate
    from bigtrain.config import ConfigError
    from bigtrain.pretrain import preflight

    wide = write_dataset(tmp_path / "wide", random_docs(30, seed=1, vocab=512), dtype=np.int32)
    cfg = make_cfg(wide, vocab=512)
    cfg.train.run_dir = str(tmp_path / "run")
    preflight(cfg, rank=0)
    narrow = write_dataset(tmp_path / "narrow", random_docs(30, seed=1, vocab=256), dtype=np.uint8)
    cfg.data.train = narrow
    message = f"{narrow}.idx: token dtype uint8 cannot hold ids up to 511"
    with pytest.raises(ConfigError, match=message):
        preflight(cfg, rank=0)
    with pytest.raises(SystemExit) as exit_info:  # configs/tiny.yaml has vocab_size 512
        evaluate.main(
            [
                "--config",
                "configs/tiny.yaml",
                "--data",
                narrow,
                "--set",
                "data.mock=false",
                f"data.train={narrow}",
            ]
        )
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"bigtrain.evaluate: data error: {message} (vocab size 512")


def test_token_stats_are_keyed_by_the_preprocessing_run(tmp_path, monkeypatch):
    """Same sizes and mtimes (a ``cp -p``, a coarse-mtime file system) but another preprocessing run,
    recorded in the metadata: the cached id range is not trusted."""
    scans = []
    original = validate_module.scan_token_range
    monkeypatch.setattr(validate_module, "scan_token_range", lambda *a: scans.append(a) or original(*a))
    prefix = write_dataset(tmp_path / "x", [[5, 6, 2], [7, 8, 2]], meta={**META, "preprocess_id": "a"})
    assert validate_data(prefix, vocab_size=100)[0].shards[0].max_id == 8
    stamps = {ext: os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx")}
    write_dataset(prefix, [[5, 6, 2], [7, 99, 2]], meta={**META, "preprocess_id": "b"})
    for ext, ns in stamps.items():
        os.utime(prefix + ext, ns=(ns, ns))
    assert validate_data(prefix, vocab_size=100)[0].shards[0].max_id == 99
    assert len(scans) == 2
    assert validate_data(prefix, vocab_size=100)[0].shards[0].max_id == 99
    assert len(scans) == 2  # unchanged since: cached


def test_a_blend_of_two_tokenizers_is_refused_without_data_tokenizer(tmp_path):
    """Nothing else catches it when data.tokenizer is unset: both vocabularies fit, the ids just mean
    different things. A blend, and train/valid data (pre-flight), must come from one tokenizer."""
    from bigtrain.data import check_same_tokenizer

    a = write_dataset(tmp_path / "a", random_docs(30, seed=1), meta=META)
    b = write_dataset(
        tmp_path / "b", random_docs(30, seed=2), meta={**META, "tokenizer_fingerprint": "e" * 64}
    )
    c = write_dataset(tmp_path / "c", random_docs(30, seed=3), meta=META)
    with pytest.raises(DataError) as err:
        validate_data([[0.7, a], [0.3, b]], vocab_size=100)
    assert str(err.value).startswith(
        f"{b}.meta.json: tokenized with another tokenizer (fingerprint eeeeeeeeeeee)"
    )
    assert f"than {a}.meta.json (ffffffffffff)" in str(err.value)
    validate_data([[0.7, a], [0.3, c]], vocab_size=100)  # one tokenizer: fine
    train, valid = validate_data(a, vocab_size=100), validate_data(b, vocab_size=100)
    with pytest.raises(DataError, match=r"b\.meta\.json: tokenized with another tokenizer"):
        check_same_tokenizer(train + valid)
