"""The bert family's samples (bigtrain.data.bert): item format, determinism, masking statistics, whole
words, NSP/SOP pairs, truncation, blends and mock data, the pair equal to the HF export's encoding, and
the errors for bad settings, data and tokenizers.

Most tests read a corpus whose every token id is unique (id = 7 + its place in the corpus), so a
sample's original tokens say exactly which document and which positions they came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.config import ConfigError, config_from_dict, validate
from bigtrain.data import DataError, batch_iterator, build_datasets
from bigtrain.data.bert import BertDataset, BertTokenizerInfo
from tests.data.util import FakeBertTokenizer, make_cfg, random_docs, write_dataset, write_sentence_dataset

CLS, SEP, MASK, PAD = 4, 5, 6, 3
FIRST_ID = 7


def unique_corpus(n_docs: int, seed: int, max_len: int = 20) -> list[list[list[int]]]:
    """Documents of 3-9 sentences of 3-``max_len`` tokens; every id unique, in corpus order."""
    rng = np.random.default_rng(seed)
    next_id, docs = FIRST_ID, []
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(3, 10))):
            n = int(rng.integers(3, max_len + 1))
            doc.append(list(range(next_id, next_id + n)))
            next_id += n
        docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bert_data")
    docs = unique_corpus(120, seed=0)
    prefix = write_sentence_dataset(root / "web", docs)
    doc_of, sentence_start = {}, set()
    for d, doc in enumerate(docs):
        for sentence in doc:
            sentence_start.add(sentence[0])
            doc_of.update({i: d for i in sentence})
    return {"root": root, "prefix": prefix, "docs": docs, "doc_of": doc_of, "sentence_start": sentence_start}


def bert_cfg(train, *, seq=48, steps=40, gbs=8, pair="nsp", whole_word=False, **masking):
    cfg = make_cfg(train, seq=seq, steps=steps, gbs=gbs, vocab=100_000, split="90,10,0")
    cfg.model.family = "bert"
    cfg.data.masking.sentence_pair = pair
    cfg.data.masking.whole_word = whole_word
    for key, value in masking.items():
        setattr(cfg.data.masking, key, value)
    return cfg


def build(cfg, tokenizer=None, cache: Path | None = None):
    cfg.data.cache_dir = str(cache) if cache else None
    return build_datasets(cfg, tokenizer or FakeBertTokenizer())


def originals(item: dict) -> np.ndarray:
    """The sample's ids before masking (labels where predicted)."""
    return torch.where(item["loss_mask"] > 0, item["labels"], item["tokens"]).numpy()


def segments(item: dict) -> tuple[np.ndarray, np.ndarray]:
    """Segments A and B (original ids) of ``[CLS] A [SEP] B [SEP]`` (B empty for one segment)."""
    ids = originals(item)[: int(item["attention_mask"].sum())]
    assert ids[0] == CLS and ids[-1] == SEP
    seps = np.flatnonzero(ids == SEP)
    b = ids[seps[0] + 1 : seps[-1]] if len(seps) == 2 else ids[:0]
    return ids[1 : seps[0]], b


def run(ids: np.ndarray) -> bool:
    """Consecutive corpus positions (one stretch of one document's text)."""
    return bool(np.all(np.diff(ids) == 1))


def test_item_format_and_collate(corpus: dict, tmp_path: Path) -> None:
    train, valid = build(bert_cfg(corpus["prefix"]), cache=tmp_path)
    assert valid is not None and len(train) >= 40 * 8
    item = train[5]
    assert set(item) == {
        "tokens", "token_types", "attention_mask", "labels", "loss_mask", "nsp_labels", "sample_id", "corpus_id",
    }  # fmt: skip
    for key in ("tokens", "token_types", "attention_mask", "labels"):
        assert item[key].dtype == torch.int64 and item[key].shape == (48,), key
    assert item["loss_mask"].dtype == torch.float32 and item["loss_mask"].shape == (48,)
    assert item["nsp_labels"].dtype == torch.int64 and item["nsp_labels"].shape == ()
    assert (item["sample_id"], item["corpus_id"]) == (5, 0)
    n = int(item["attention_mask"].sum())
    assert item["attention_mask"][:n].all() and not item["attention_mask"][n:].any()
    assert (item["tokens"][n:] == PAD).all() and (item["token_types"][n:] == 0).all()
    labels = item["labels"]
    assert ((labels >= 0) & (labels < 100_000)).all()  # valid ids everywhere (vocab-parallel CE)
    assert (labels[item["loss_mask"] == 0] == PAD).all() and item["loss_mask"].sum() >= 1
    batch = next(iter(batch_iterator(train, 0, 4, 8, 0, 1, prefetch=0)))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == {
        "tokens": (torch.int64, (4, 48)), "labels": (torch.int64, (4, 48)),
        "loss_mask": (torch.float32, (4, 48)), "token_types": (torch.int64, (4, 48)),
        "attention_mask": (torch.int64, (4, 48)), "nsp_labels": (torch.int64, (4,)),
        "sample_ids": (torch.int64, (4,)),
    }  # fmt: skip
    assert batch["nsp_labels"].tolist() == [int(train[i]["nsp_labels"]) for i in range(4)]


def test_samples_are_a_pure_function_of_seed_and_index(corpus: dict, tmp_path: Path) -> None:
    """Built twice (separate objects, separate caches), read in other orders: the same samples; another
    seed or index gives others."""
    a, _ = build(bert_cfg(corpus["prefix"], whole_word=True), cache=tmp_path / "a")
    b, _ = build(bert_cfg(corpus["prefix"], whole_word=True), cache=tmp_path / "b")
    order = [17, 3, 250, 3, 0]
    first = [a[i] for i in order]
    second = [b[i] for i in reversed(order)][::-1]
    for x, y in zip(first, second):
        assert all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
    assert not torch.equal(a[3]["tokens"], a[4]["tokens"])
    other = bert_cfg(corpus["prefix"], whole_word=True)
    other.train.seed = 99
    c, _ = build(other, cache=tmp_path / "c")
    assert any(not torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(8))
    # every data-parallel layout reads the same samples: rank slices of one global batch
    whole = next(iter(batch_iterator(a, 0, 8, 8, 0, 1, prefetch=0)))
    halves = [next(iter(batch_iterator(b, 0, 4, 8, r, 2, prefetch=0))) for r in range(2)]
    for key in whole:
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves])), key


def test_masking_statistics(corpus: dict, tmp_path: Path) -> None:
    train, _ = build(bert_cfg(corpus["prefix"], steps=250), cache=tmp_path)
    real = predicted = as_mask = kept = special_hits = 0
    for i in range(2000):
        item = train[i]
        ids, loss = originals(item), item["loss_mask"].numpy() > 0
        tokens = item["tokens"].numpy()
        n = int(item["attention_mask"].sum())
        special = np.isin(ids, [CLS, SEP, PAD]) | (np.arange(len(ids)) >= n)
        special_hits += int((loss & special).sum())
        real += int((~special).sum())
        predicted += int(loss.sum())
        as_mask += int((tokens[loss] == MASK).sum())
        kept += int((tokens[loss] == ids[loss]).sum())
    assert special_hits == 0
    assert abs(predicted / real - 0.15) < 0.01, predicted / real
    assert abs(as_mask / predicted - 0.8) < 0.02
    assert abs(kept / predicted - 0.1) < 0.02  # a random replacement equal to the original: ~1e-5
    assert abs((predicted - as_mask - kept) / predicted - 0.1) < 0.02


def test_configured_fractions(corpus: dict, tmp_path: Path) -> None:
    cfg = bert_cfg(corpus["prefix"], prob=0.3, mask_fraction=0.5, random_fraction=0.5)
    train, _ = build(cfg, cache=tmp_path)
    real = predicted = as_mask = kept = 0
    for i in range(300):
        item = train[i]
        ids, loss = originals(item), item["loss_mask"].numpy() > 0
        real += int((item["attention_mask"].numpy() > 0).sum() - 2 - int(item["token_types"].sum() > 0))
        predicted += int(loss.sum())
        as_mask += int((item["tokens"].numpy()[loss] == MASK).sum())
        kept += int((item["tokens"].numpy()[loss] == ids[loss]).sum())
    assert abs(predicted / real - 0.3) < 0.02 and abs(as_mask / predicted - 0.5) < 0.05 and kept <= 1


def test_whole_word_masking_masks_every_piece_of_a_chosen_word(corpus: dict, tmp_path: Path) -> None:
    """Words start at a '▁' piece (every third id here), at a sentence start and at a segment start."""
    train, _ = build(bert_cfg(corpus["prefix"], whole_word=True), cache=tmp_path)
    multi_piece = 0
    for i in range(300):
        item = train[i]
        a, b = segments(item)
        loss = item["loss_mask"].numpy() > 0
        for offset, seg in ((1, a), (len(a) + 2, b)):
            starts = np.array(
                [k == 0 or t % 3 == 0 or t in corpus["sentence_start"] for k, t in enumerate(seg)]
            )
            words = np.split(np.arange(len(seg)) + offset, np.flatnonzero(starts)[1:])
            for word in words:
                assert loss[word].all() or not loss[word].any(), (i, word)
                multi_piece += int(len(word) > 1 and loss[word].all())
    assert multi_piece > 100
    # without whole_word, a word's pieces are chosen apart
    plain, _ = build(bert_cfg(corpus["prefix"]), cache=tmp_path / "plain")
    partial = 0
    for i in range(100):
        a, _ = segments(plain[i])
        loss = plain[i]["loss_mask"].numpy()[1 : len(a) + 1] > 0
        starts = np.array([k == 0 or t % 3 == 0 or t in corpus["sentence_start"] for k, t in enumerate(a)])
        partial += sum(
            0 < loss[w].sum() < len(w) for w in np.split(np.arange(len(a)), np.flatnonzero(starts)[1:])
        )
    assert partial > 0


def test_nsp_pairs(corpus: dict, tmp_path: Path) -> None:
    """Label 0: B continues A in the same document; label 1: B from another document; about half each."""
    train, _ = build(bert_cfg(corpus["prefix"], steps=60), cache=tmp_path)
    labels, adjacent = [], 0
    for i in range(400):
        item = train[i]
        a, b = segments(item)
        assert run(a) and run(b) and len(a) and len(b)
        assert (item["token_types"][: len(a) + 2] == 0).all() and (
            item["token_types"][len(a) + 2 : len(a) + len(b) + 3] == 1
        ).all()
        label = int(item["nsp_labels"])
        labels.append(label)
        if label == 0:
            assert corpus["doc_of"][a[0]] == corpus["doc_of"][b[0]] and b[0] > a[-1]
            adjacent += int(b[0] == a[-1] + 1)
        else:
            assert corpus["doc_of"][a[0]] != corpus["doc_of"][b[0]]
    assert 0.42 < np.mean(labels) < 0.58
    assert adjacent > 0.5 * labels.count(0)  # trimming at the junction only when A/B is too long


def test_sop_pairs(corpus: dict, tmp_path: Path) -> None:
    """Label 0: A then B in document order; label 1: the same two segments swapped."""
    train, _ = build(bert_cfg(corpus["prefix"], pair="sop"), cache=tmp_path)
    labels = []
    for i in range(300):
        item = train[i]
        a, b = segments(item)
        assert corpus["doc_of"][a[0]] == corpus["doc_of"][b[0]]
        label = int(item["nsp_labels"])
        labels.append(label)
        assert (b[0] > a[-1]) if label == 0 else (a[0] > b[-1])
    assert 0.4 < np.mean(labels) < 0.6


def test_one_segment(corpus: dict, tmp_path: Path) -> None:
    train, _ = build(bert_cfg(corpus["prefix"], pair="none"), cache=tmp_path)
    for i in range(100):
        item = train[i]
        a, b = segments(item)
        assert len(b) == 0 and run(a) and int(item["nsp_labels"]) == 0
        assert not item["token_types"].any()


def test_truncation_to_seq_length(tmp_path: Path) -> None:
    """Sentences longer than the sequence: every sample filled to seq_length, each segment a stretch."""
    docs = unique_corpus(60, seed=1, max_len=40)
    prefix = write_sentence_dataset(tmp_path / "long", docs)
    train, _ = build(bert_cfg(prefix, seq=24, short_seq_prob=0.0), cache=tmp_path / "cache")
    full = 0
    for i in range(200):
        item = train[i]
        a, b = segments(item)
        n = int(item["attention_mask"].sum())
        assert n <= 24 and len(a) + len(b) + 3 == n and run(a) and run(b)
        full += n == 24
    assert full > 150


def test_short_seq_prob_shortens_samples(corpus: dict, tmp_path: Path) -> None:
    def mean_length(prob: float) -> float:
        train, _ = build(bert_cfg(corpus["prefix"], seq=128, short_seq_prob=prob), cache=tmp_path)
        return float(np.mean([int(train[i]["attention_mask"].sum()) for i in range(200)]))

    assert mean_length(1.0) < 0.8 * mean_length(0.0)


def test_blend_and_valid_corpus(corpus: dict, tmp_path: Path) -> None:
    other = write_sentence_dataset(tmp_path / "code", unique_corpus(40, seed=2))
    cfg = bert_cfg([[0.5, corpus["prefix"]], [0.5, other]])
    train, valid = build(cfg, cache=tmp_path / "cache")
    ids = [train[i]["corpus_id"] for i in range(200)]
    assert set(ids) == {0, 1} and 0.35 < np.mean(ids) < 0.65
    cfg = bert_cfg(corpus["prefix"])
    cfg.data.valid = other
    train, valid = build(cfg, cache=tmp_path / "cache2")
    assert valid is not None and valid[0]["tokens"].shape == (48,)


def test_mock_data_is_deterministic(tmp_path: Path) -> None:
    cfg = make_cfg(None, seq=32, steps=5, gbs=4, vocab=300, mock=True)
    cfg.model.family = "bert"
    a, va = build_datasets(cfg, None)
    b, _ = build_datasets(cfg, None)
    assert va is not None and len(a) >= 20
    for i in (0, 7, 19):
        assert all(torch.equal(torch.as_tensor(a[i][k]), torch.as_tensor(b[i][k])) for k in a[i])
        assert a[i]["tokens"][0] == CLS and a[i]["loss_mask"].sum() >= 1
    assert {int(a[i]["nsp_labels"]) for i in range(20)} == {0, 1}


def test_pair_equals_the_hf_export_encoding(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Two-sentence documents through preprocess's encoder and the dataset (SOP, so A/B stay whole):
    the unmasked ids and token types equal AutoTokenizer(export)(a, b) for the same two sentences."""
    from transformers import AutoTokenizer

    from tests.tokenizer.hf_dirs import bert_sentencepiece_dir
    from tokenizer import Tokenizer, export_files
    from tokenizer.sentences import encode_sentence_documents, split_sentences

    tok_dir = bert_sentencepiece_dir(tmp_path_factory.mktemp("bert_tok"))
    tok = Tokenizer.load(tok_dir)
    words = "the model reads tokens from the dataset and learns to predict".split()
    rng = np.random.default_rng(0)
    texts = [
        " ".join(rng.choice(words, 4)).capitalize() + f" {d}. " + " ".join(rng.choice(words, 5)) + "!"
        for d in range(60)
    ]
    docs = encode_sentence_documents(tok, [t.encode() for t in texts])
    prefix = write_sentence_dataset(tmp_path / "pairs", [[s.tolist() for s in d] for d in docs])
    export = tmp_path / "export"
    export.mkdir()
    export_files(tok_dir, export)
    hf = AutoTokenizer.from_pretrained(str(export))
    by_first = {tuple(d[0].tolist()): split_sentences(t) for d, t in zip(docs, texts)}
    cfg = bert_cfg(prefix, seq=64, pair="sop", short_seq_prob=0.0)
    train, _ = build(cfg, tok, cache=tmp_path / "cache")
    for i in range(40):
        item = train[i]
        n = int(item["attention_mask"].sum())
        a, b = segments(item)
        label = int(item["nsp_labels"])
        first, second = by_first[tuple((b if label else a).tolist())]
        pair = (second, first) if label else (first, second)
        enc = hf(*pair)
        assert originals(item)[:n].tolist() == enc["input_ids"]
        assert item["token_types"][:n].tolist() == enc["token_type_ids"]


def test_word_starts_of_both_conventions(tmp_path: Path) -> None:
    from tests.tokenizer.hf_dirs import wordpiece_dir
    from tokenizer import Tokenizer

    wp = Tokenizer.load(wordpiece_dir(tmp_path))
    info = BertTokenizerInfo.from_tokenizer(wp)
    ids = wp.encode("tokenization learns tokenizers")
    pieces = [wp.id_to_piece(i) for i in ids]
    assert any(p.startswith("##") for p in pieces)
    assert info.word_start[ids].tolist() == [not p.startswith("##") for p in pieces]
    assert (info.cls, info.sep, info.mask, info.pad) == (2, 3, 4, 0)
    assert not np.isin(info.random_ids, [0, 1, 2, 3, 4]).any()


def test_tokenizer_without_bert_specials_is_named(corpus: dict, tmp_path: Path) -> None:
    from tests.tokenizer.hf_dirs import llama3_dir
    from tokenizer import Tokenizer

    llama = Tokenizer.load(llama3_dir(tmp_path / "llama3"))
    with pytest.raises(DataError) as e:
        build(bert_cfg(corpus["prefix"]), llama, cache=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "llama3") in msg and "[CLS]/[SEP]/[MASK]/pad" in msg
    assert "--bert-specials" in msg
    with pytest.raises(DataError, match="data.tokenizer"):
        build_datasets(bert_cfg(corpus["prefix"]), None)


def test_data_without_sentences_is_refused(tmp_path: Path) -> None:
    prefix = write_dataset(tmp_path / "gpt", random_docs(50, seed=0, vocab=900, base=7), np.int32)
    with pytest.raises(DataError, match=r"--split-sentences") as e:
        build(bert_cfg(prefix), cache=tmp_path / "cache")
    assert "gpt" in str(e.value) and "\n" not in str(e.value)
    train, _ = build(bert_cfg(prefix, pair="none"), cache=tmp_path / "cache")  # one segment: documents do
    assert segments(train[0])[1].size == 0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("prob", 0.0, "data.masking.prob must be in (0, 1), got 0.0"),
        ("prob", 1.0, "data.masking.prob must be in (0, 1)"),
        ("mask_fraction", 1.5, "data.masking.mask_fraction must be in [0, 1], got 1.5"),
        ("random_fraction", -0.1, "data.masking.random_fraction must be in [0, 1]"),
        ("random_fraction", 0.3, "data.masking.mask_fraction + random_fraction must be <= 1"),
        ("sentence_pair", "next", "data.masking.sentence_pair must be nsp|sop|none, got 'next'"),
        ("short_seq_prob", 2.0, "data.masking.short_seq_prob must be in [0, 1], got 2.0"),
    ],
)
def test_masking_settings_are_validated(key: str, value: object, message: str) -> None:
    model = {"family": "bert", "hf_model_type": "bert", "activation": "gelu", "tie_embeddings": True,
             "vocab_size": 1000}  # fmt: skip
    cfg = config_from_dict({"model": model, "data": {"mock": True, "masking": {key: value}}})
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    validate(config_from_dict({"model": model, "data": {"mock": True}}), 1)  # the defaults pass
    llama = config_from_dict({"model": {"vocab_size": 1000}, "data": {"mock": True, "masking": {key: value}}})
    validate(llama, 1)  # only the bert family reads data.masking


def test_megatron_cache_keys_include_the_masking(corpus: dict, tmp_path: Path) -> None:
    """Settings that shape the samples are in megatron's cache description (no stale sample index)."""
    train, _ = build(bert_cfg(corpus["prefix"], pair="sop", whole_word=True), cache=tmp_path)
    dataset = train.dataset
    assert isinstance(dataset, BertDataset)
    described = json.loads(dataset.unique_description)
    assert described["sentence_pair"] == "sop" and described["masking_do_full_word"] is True
    assert described["tokenizer"]["ids"] == [CLS, SEP, MASK, PAD]


def test_resume_order_check_reads_bert_samples(corpus: dict, tmp_path: Path) -> None:
    """first_changed_sample on bert datasets built for two sample counts: every sample before the
    answer is the same, the answer (when any) differs; and one count against itself is unchanged."""
    from bigtrain.data.datasets import first_changed_sample

    def train(count: int):
        cfg = bert_cfg(corpus["prefix"])
        cfg.data.train_samples = count
        return build(cfg, cache=tmp_path)[0]

    def same(x: dict, y: dict) -> bool:
        return all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)

    small, again = train(200), train(200)
    assert first_changed_sample(small, again, 200) is None
    large = train(5000)
    changed = first_changed_sample(small, large, 200)
    checked = range(200) if changed is None else range(changed)
    assert all(same(small[i], large[i]) for i in checked)
    if changed is not None:
        assert not same(small[changed], large[changed])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_gloo_ranks_read_the_single_process_samples(corpus: dict, tmp_path: Path) -> None:
    """Two ranks build the bert samples together (rank 0 writes megatron's cache first) and their
    micro-batches, put together, are the single-process global batches."""
    import subprocess
    import sys

    from tests.conftest import REPO, cpu_env, free_port
    from tests.data.bert_dist_worker import GBS, KEYS, MBS, STEPS, bert_dist_cfg

    out, cache, port = tmp_path / "out", str(tmp_path / "cache"), str(free_port())
    out.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.data.bert_dist_worker", corpus["prefix"], cache, str(out)],
            cwd=REPO,
            env=cpu_env(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    reference, _ = build_datasets(
        bert_dist_cfg(corpus["prefix"], str(tmp_path / "single")), FakeBertTokenizer()
    )
    assert ranks[0]["len"] == ranks[1]["len"] == len(reference)
    whole = batch_iterator(reference, 0, GBS, GBS, 0, 1, prefetch=0)
    per_step = GBS // (MBS * 2)
    for step in range(STEPS):
        want = next(whole)
        got = [ranks[r]["batches"][step * per_step : (step + 1) * per_step] for r in range(2)]
        for key in KEYS:
            rows = [row for r in range(2) for b in got[r] for row in b[key]]
            assert rows == want[key].tolist(), (step, key)


def test_empty_documents_are_never_drawn(tmp_path: Path) -> None:
    """Documents with no sentence (a text the normalizer empties) are neither sampled nor NSP's B."""
    docs = unique_corpus(30, seed=3)
    docs = [d for pair in zip(docs, [[]] * len(docs)) for d in pair]  # every other document empty
    prefix = write_sentence_dataset(tmp_path / "holes", docs)
    train, _ = build(bert_cfg(prefix), cache=tmp_path / "cache")
    labels = []
    for i in range(200):
        a, b = segments(train[i])
        assert len(a) and len(b) and run(a) and run(b)
        labels.append(int(train[i]["nsp_labels"]))
    assert 0 < np.mean(labels) < 1
