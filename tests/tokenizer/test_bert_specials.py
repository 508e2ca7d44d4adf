"""BERT's special tokens on both tokenizer backends: ``tokenizer.train --bert-specials`` and its HF files
(``[CLS] A [SEP] B [SEP]`` with token types 0/1, ``mask_token`` for ``fill-mask``), a WordPiece
``tokenizer.json`` (bert-base-uncased-shaped), and decoder tokenizers left as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tokenizer.hf_dirs import bert_sentencepiece_dir, wordpiece_dir
from tokenizer import BERT_SPECIALS, PAD_ID, Tokenizer, export_files
from tokenizer import train as train_cli
from tokenizer.hf import PROBE_TEXTS
from tokenizer.hf_backend import verify_parity

PAIRS = [
    ("Hello, world! The quick brown fox.", "中文分词测试：你好，世界！"),
    ("def add(a: int, b: int) -> int:", "  two leading spaces"),
    ("the model reads tokens", "literal [MASK] and [CLS] as text"),
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bert_sentencepiece_dir(tmp_path_factory.mktemp("bert_sp"))


@pytest.fixture(scope="module")
def wp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wordpiece")
    return wordpiece_dir(out)


def test_sentencepiece_bert_specials_are_control_ids(bert_dir: Path) -> None:
    tok = Tokenizer.load(bert_dir)
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (4, 5, 6, PAD_ID)
    assert [tok.id_to_piece(i) for i in (4, 5, 6)] == list(BERT_SPECIALS)
    assert tok.missing_bert_specials() == []
    # control symbols: literal text never becomes those ids (only the dataset puts them in a sample)
    ids = tok.encode("a literal [MASK] [CLS] [SEP] here")
    assert not {4, 5, 6} & set(ids)
    assert tok.decode(ids) == "a literal [MASK] [CLS] [SEP] here"
    meta = json.loads((bert_dir / "bigtrain_tokenizer.json").read_text())
    assert meta["bert_specials"] == list(BERT_SPECIALS) and meta["hf_add_bos"] is False


def test_hf_export_encodes_pairs_like_bert(bert_dir: Path, tmp_path: Path) -> None:
    """The exported directory through AutoTokenizer: ids and token types equal bigtrain's own ids."""
    from transformers import AutoTokenizer

    tok = Tokenizer.load(bert_dir)
    export_files(bert_dir, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    cls, sep = tok.cls_id, tok.sep_id
    for a, b in PAIRS:
        ids_a, ids_b = tok.encode(a), tok.encode(b)
        enc = hf(a, b, split_special_tokens=True)
        assert enc["input_ids"] == [cls, *ids_a, sep, *ids_b, sep]
        assert enc["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
        assert hf(a, split_special_tokens=True)["input_ids"] == tok.encode_as_hf(a) == [cls, *ids_a, sep]
    assert (hf.cls_token, hf.sep_token, hf.mask_token, hf.pad_token) == ("[CLS]", "[SEP]", "[MASK]", "<pad>")
    assert (hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.pad_token_id) == (4, 5, 6, 3)
    # a user's "[MASK]" in a fill-mask prompt is the mask id (split_special_tokens false, as in BERT)
    assert hf("Paris is the [MASK].")["input_ids"].count(tok.mask_id) == 1


def test_fill_mask_pipeline_runs_on_the_export(bert_dir: Path, tmp_path: Path) -> None:
    """transformers' fill-mask pipeline finds the mask through the exported tokenizer_config."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, pipeline

    export_files(bert_dir, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(hf), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=hf.pad_token_id,
    )  # fmt: skip
    fill = pipeline("fill-mask", model=BertForMaskedLM(config).eval(), tokenizer=hf, top_k=3)
    out = fill("the model reads [MASK] from the dataset")
    assert len(out) == 3 and all(r["token"] != hf.mask_token_id for r in out)
    assert all("[MASK]" not in r["sequence"] for r in out)


def test_decoder_tokenizer_has_no_bert_specials_and_keeps_its_export(tok_dir: Path) -> None:
    tok = Tokenizer.load(tok_dir)
    assert (tok.cls_id, tok.sep_id, tok.mask_id) == (None, None, None)
    assert tok.missing_bert_specials() == ["[CLS]", "[SEP]", "[MASK]"]
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and not {"cls_token", "mask_token", "model_input_names"} & set(
        config
    )
    assert tok.encode_as_hf("hello") == [tok.bos_id, *tok.encode("hello")]


def test_wordpiece_tokenizer_json_exposes_bert_ids(wp_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = Tokenizer.load(wp_dir)
    hf = AutoTokenizer.from_pretrained(str(wp_dir))
    assert tok.kind == "huggingface"
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (
        hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.pad_token_id,
    )  # fmt: skip
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (2, 3, 4, 0)
    assert tok.missing_bert_specials() == []
    assert verify_parity(tok, PROBE_TEXTS) == len(PROBE_TEXTS)
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert any(p.startswith("##") for p in pieces) and pieces[:5] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    a, b = PAIRS[0]
    enc = hf(a, b)
    assert enc["input_ids"] == [tok.cls_id, *tok.encode(a), tok.sep_id, *tok.encode(b), tok.sep_id]


def test_bert_specials_cannot_repeat_as_special_tokens(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        train_cli.parse_args(
            ["--input", "x.jsonl", "--vocab-size", "1000", "--output", str(tmp_path), "--bert-specials",
             "--special-tokens", "[MASK]"]
        )  # fmt: skip
    assert "--bert-specials" in capsys.readouterr().err
