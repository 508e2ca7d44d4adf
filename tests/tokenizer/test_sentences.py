"""``tokenizer.preprocess --split-sentences``: documents written as their sentences (the bert family's
data), each sentence's ids those of the text alone, no EOD; a tokenizer without BERT's specials refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.tokenizer.corpus import make_corpus, write_jsonl
from tests.tokenizer.hf_dirs import bert_sentencepiece_dir
from tests.tokenizer.test_preprocess import preprocess_cmd
from tokenizer import Tokenizer
from tokenizer.sentences import MAX_SENTENCE_TOKENS, encode_sentence_documents, split_sentences


def test_split_sentences_rules() -> None:
    text = 'Hello there. How are you?  I am "fine." Ok!\nA line (x.) y\n\n中文。你好！世界 and 3.14 is pi...'
    assert split_sentences(text) == [
        "Hello there.", "How are you?", 'I am "fine."', "Ok!", "A line (x.)", "y", "中文。", "你好！",
        "世界 and 3.14 is pi...",
    ]  # fmt: skip
    assert split_sentences("  \n\t ") == []
    assert split_sentences("def f(x):\n    return x.y") == ["def f(x):", "return x.y"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bert_sentencepiece_dir(tmp_path_factory.mktemp("bert_sp"))


def test_long_sentences_are_cut_to_what_megatron_keeps(bert_dir: Path) -> None:
    tok = Tokenizer.load(bert_dir)
    long = " ".join(["tokens"] * 1500)
    (doc,) = encode_sentence_documents(tok, [f"Short one. {long}".encode()])
    assert [s.size for s in doc[1:]] == [MAX_SENTENCE_TOKENS] * 2 + [tok.encode(long).__len__() - 1024]
    assert np.concatenate(doc[1:]).tolist() == tok.encode(long) and doc[0].tolist() == tok.encode(
        "Short one."
    )


@pytest.mark.parametrize("shard", [0, 3000])
def test_preprocess_writes_sentences_without_eod(bert_dir: Path, tmp_path: Path, shard: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = make_corpus(60, seed=3)
    corpus = write_jsonl(tmp_path / "in.jsonl", docs)
    prefix = tmp_path / "out" / "bert"
    extra = ["--split-sentences", "--workers", "2", "--shard-size-tokens", str(shard)]
    subprocess.run(preprocess_cmd([str(corpus)], bert_dir, prefix, *extra), check=True, timeout=120)
    tok = Tokenizer.load(bert_dir)
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    assert meta["split_sentences"] is True and meta["eod_id"] is None
    prefixes = [str(prefix)] if not shard else [str(prefix.parent / s["prefix"]) for s in meta["shards"]]
    assert len(prefixes) == (1 if not shard else len(meta["shards"])) and (not shard or len(prefixes) > 1)
    got = []
    for p in prefixes:
        ds = IndexedDataset(p)
        bounds = ds.document_indices
        got += [[ds[i].tolist() for i in range(bounds[d], bounds[d + 1])] for d in range(len(bounds) - 1)]
        del ds
    want = [[tok.encode(s) for s in split_sentences(d)] for d in docs if d.strip()]
    assert got == want
    assert sum(len(d) for d in got) > 2 * len(got)  # several sentences per document
    assert tok.eod_id not in {i for d in got for s in d for i in s}


def test_preprocess_refuses_a_tokenizer_without_bert_specials(tok_dir: Path, tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "in.jsonl", make_corpus(5, seed=3))
    cmd = preprocess_cmd([str(corpus)], tok_dir, tmp_path / "x", "--split-sentences")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert (
        f"{tok_dir}: the tokenizer has no [CLS]/[SEP]/[MASK]" in res.stderr
        and "--bert-specials" in res.stderr
    )
    assert not list(tmp_path.glob("x*"))


def test_preprocess_sentences_with_a_wordpiece_tokenizer(tmp_path: Path) -> None:
    """A bert-base-uncased-style tokenizer.json: each sentence's ids without the post-processor's
    [CLS]/[SEP] (the dataset adds them), as ``Tokenizer.encode`` gives them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from tests.tokenizer.hf_dirs import wordpiece_dir

    wp = wordpiece_dir(tmp_path / "wp")
    docs = [*make_corpus(20, seed=4), "\u200b", "zero\u200bwidth. \u200b end"]  # the normalizer drops U+200B
    corpus = write_jsonl(tmp_path / "in.jsonl", docs)
    prefix = tmp_path / "out" / "wp"
    subprocess.run(preprocess_cmd([str(corpus)], wp, prefix, "--split-sentences"), check=True, timeout=120)
    tok = Tokenizer.load(wp)
    ds = IndexedDataset(str(prefix))
    bounds = ds.document_indices
    got = [[ds[i].tolist() for i in range(bounds[d], bounds[d + 1])] for d in range(len(bounds) - 1)]
    want = [[ids for s in split_sentences(d) if (ids := tok.encode(s))] for d in docs if d.strip()]
    assert got == want and want[-2:] == [[], [tok.encode("zero\u200bwidth."), tok.encode("end")]]
    assert tok.encode("\u200b") == []  # the empty document above: no sentence left
    assert tok.cls_id not in {i for d in got for s in d for i in s}
