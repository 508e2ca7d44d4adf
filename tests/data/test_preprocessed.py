"""End to end with the project's own tools: a SentencePiece model, ``tokenizer.preprocess`` shards and
its ``PREFIX.meta.json``, read back by bigtrain.data (fingerprint check, windows, training samples)."""

from __future__ import annotations

import io
import json
import random
import signal
from pathlib import Path

import pytest

from bigtrain.data import DataError, SequentialWindows, TokenizerInfo, build_datasets
from tests.data.util import make_cfg

WORDS = ["alpha", "beta", "gamma", "delta", "data", "train", "model", "token", "shard", "blend", "window"]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


def _train_tokenizer(directory, vocab_size: int):
    import sentencepiece as spm

    from tokenizer import Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts(300, seed=vocab_size)),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    directory.mkdir(parents=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return Tokenizer.load(directory)


def _preprocess(texts: list[str], tok_dir, prefix, *extra: str) -> None:
    """``tokenizer.preprocess`` of ``texts`` (written as JSONL beside ``prefix``) in this process."""
    from tokenizer import preprocess

    source = Path(f"{prefix}.input.jsonl")
    source.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    args = ["--input", str(source), "--tokenizer", str(tok_dir), "--output-prefix", str(prefix), *extra]
    handler = signal.getsignal(signal.SIGTERM)  # the CLI installs its own; give pytest its handler back
    try:
        assert preprocess.main(args) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    tok = _train_tokenizer(root / "tok", 100)
    texts = _texts(120, seed=1)
    _preprocess(texts, root / "tok", root / "out" / "corpus", "--shard-size-tokens", "600")
    return root, tok, texts


def test_preprocessed_shards_train_and_evaluate(preprocessed):
    root, tok, texts = preprocessed
    prefix = str(root / "out" / "corpus")
    assert (
        json.loads((root / "out" / "corpus.meta.json").read_text())["tokenizer_fingerprint"]
        == tok.fingerprint
    )
    info = TokenizerInfo.from_tokenizer(tok)
    assert (info.eod, info.pad, info.vocab_size) == (tok.eod_id, tok.pad_id, tok.vocab_size)

    train, valid = build_datasets(make_cfg(prefix, vocab=tok.vocab_size, split="90,10,0"), tokenizer=tok)
    assert len(train.corpora[0].shards) > 1 and valid is not None
    item = train[0]
    assert int(item["tokens"].max()) < tok.vocab_size

    windows = SequentialWindows(prefix, 16, tokenizer=tok)
    stream = [i for t in texts for i in tok.encode(t) + [tok.eod_id]]
    assert len(windows) == len(stream) // 17
    last = len(windows) - 1
    assert windows[last]["tokens"].tolist() == stream[last * 17 : last * 17 + 16]
    assert windows[last]["labels"].tolist() == stream[last * 17 + 1 : last * 17 + 17]


def test_other_tokenizer_is_refused_naming_the_meta_file(preprocessed):
    root, tok, _ = preprocessed
    other = _train_tokenizer(root / "other", 90)
    assert other.fingerprint != tok.fingerprint
    cfg = make_cfg(str(root / "out" / "corpus"), vocab=other.vocab_size)
    with pytest.raises(
        DataError, match=f"{root / 'out' / 'corpus.meta.json'}: data was tokenized with a different"
    ):
        build_datasets(cfg, tokenizer=other)


def _samples(dataset) -> list[list[int]]:
    return [dataset[i]["tokens"].tolist() for i in range(len(dataset))]


def test_reprocessed_prefix_never_meets_the_old_caches(preprocessed, tmp_path):
    """Issue 12 §2: corpus A (120 docs) preprocessed to data/x and trained on, then corpus B (600 docs)
    to the same prefix: the index maps and token stats of A must not be applied to B's files. Checked
    with the default cache (which preprocess cleans) and with data.cache_dir elsewhere (which it cannot
    reach, so only the content key protects it), against a build in an empty cache; then the prefix is
    re-used with another tokenizer."""
    root, tok, _ = preprocessed
    prefix = tmp_path / "data" / "x"
    default_cache = tmp_path / "data" / "cache"

    def build(vocab: int, cache_dir=None):  # no tokenizer object: megatron's own key cannot tell A from B
        cfg = make_cfg(str(prefix), vocab=vocab, split="90,10,0", cache_dir=cache_dir)
        return build_datasets(cfg)

    _preprocess(_texts(120, seed=11), root / "tok", prefix)
    first_len = len(build(tok.vocab_size)[0])
    assert len(build(tok.vocab_size, str(tmp_path / "elsewhere"))[0]) == first_len
    (entry,) = (default_cache / "index").iterdir()
    assert json.loads((entry / "inputs.json").read_text())["prefixes"] == [str(prefix)]
    assert len(list((default_cache / "token_stats").iterdir())) == 1

    _preprocess(_texts(600, seed=12), root / "tok", prefix)
    assert not entry.exists() and not list((default_cache / "token_stats").iterdir())  # invalidated
    assert len(list((tmp_path / "elsewhere" / "index").iterdir())) == 1  # out of reach, kept
    fresh_train, fresh_valid = build(tok.vocab_size, str(tmp_path / "fresh"))
    assert len(fresh_train) > 3 * first_len
    for cache_dir in (None, str(tmp_path / "elsewhere")):
        train, valid = build(tok.vocab_size, cache_dir)
        assert (len(train), len(valid)) == (len(fresh_train), len(fresh_valid))
        assert _samples(train) == _samples(fresh_train) and _samples(valid) == _samples(fresh_valid)

    # the same prefix re-used with another tokenizer (smaller vocabulary, other ids)
    other = _train_tokenizer(tmp_path / "other", 90)
    _preprocess(_texts(600, seed=12), tmp_path / "other", prefix)
    fresh_train, _ = build(other.vocab_size, str(tmp_path / "fresh_other"))
    train, _ = build(other.vocab_size, str(tmp_path / "elsewhere"))
    assert _samples(train) == _samples(fresh_train)
    assert max(max(s) for s in _samples(train)) < other.vocab_size
