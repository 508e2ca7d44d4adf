"""End to end with the project's own tools: a SentencePiece model, ``tokenizer.preprocess`` shards and
its ``PREFIX.meta.json``, read back by bigtrain.data (fingerprint check, windows, training samples)."""

from __future__ import annotations

import io
import json
import random
import signal

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


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    tok = _train_tokenizer(root / "tok", 100)
    texts = _texts(120, seed=1)
    with open(root / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    from tokenizer import preprocess

    args = ["--input", str(root / "docs.jsonl"), "--tokenizer", str(root / "tok")]
    args += ["--output-prefix", str(root / "out" / "corpus"), "--shard-size-tokens", "600"]
    handler = signal.getsignal(signal.SIGTERM)  # the CLI installs its own; give pytest its handler back
    try:
        assert preprocess.main(args) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
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
