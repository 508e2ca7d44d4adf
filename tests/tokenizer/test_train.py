"""tokenizer.train + the Tokenizer API: HF parity, exact round trip, byte fallback, metadata."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cmd
from tests.tokenizer.conftest import VOCAB
from tests.tokenizer.corpus import held_out_lines, make_corpus, write_jsonl
from tokenizer import Tokenizer

HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def assert_hf_parity_and_round_trip(out: Path, lines: list[str]) -> None:
    """Every line: AutoTokenizer ids == [BOS] + sentencepiece ids, exact decode, never <unk>."""
    from transformers import AutoTokenizer

    tok = Tokenizer.load(out)
    hf = AutoTokenizer.from_pretrained(str(out))
    hf_ids = hf(lines, split_special_tokens=True)["input_ids"]  # literal "<s>" as text, like SentencePiece
    mismatched = [line for line, got in zip(lines, hf_ids) if got != tok.encode(line, add_bos=True)]
    assert not mismatched, f"{len(mismatched)}/{len(lines)} lines differ, e.g. {mismatched[:3]}"
    for line in lines:
        ids = tok.encode(line)
        assert tok.unk_id not in ids, line
        assert tok.decode(ids) == line
        assert hf.decode(tok.encode(line, add_bos=True), skip_special_tokens=True) == line


def test_held_out_text_hf_parity_round_trip_no_unk(tok_dir: Path, tmp_path: Path) -> None:
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(held_out_lines()), encoding="utf-8")
    lines = held_out.read_text(encoding="utf-8").split("\n")
    assert any(not line.strip() for line in lines) and any("\t" in line for line in lines)
    assert_hf_parity_and_round_trip(tok_dir, lines)
    # characters never seen in training must come out as UTF-8 byte pieces, not <unk>
    tok = Tokenizer.load(tok_dir)
    pieces = [tok._sp.id_to_piece(i) for i in tok.encode("𠀋")]
    assert pieces == ["<0xF0>", "<0xA0>", "<0x80>", "<0x8B>"]


def test_training_writes_self_contained_hf_dir_and_meta(tok_dir: Path, tmp_path: Path) -> None:
    for name in HF_FILES + ("bigtrain_tokenizer.json",):
        assert (tok_dir / name).is_file(), name
    meta = json.loads((tok_dir / "bigtrain_tokenizer.json").read_text())
    tok = Tokenizer.load(tok_dir)
    assert meta["vocab_size"] == tok.vocab_size == VOCAB
    assert (meta["unk_id"], meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["eod_id"]) == (0, 1, 2, 3, 2)
    assert meta["fingerprint"] == tok.fingerprint
    assert meta["model_type"] == "bpe" and meta["training"]["documents"] == 400
    # an export copies the files next to weights: they must still load from there
    export = tmp_path / "export"
    export.mkdir()
    for name in HF_FILES:
        (export / name).write_bytes((tok_dir / name).read_bytes())
    assert_hf_parity_and_round_trip(export, ["x = 1  # 中文 🚀", "<|sep|>tail"])


def test_special_token_is_one_id_in_both(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = Tokenizer.load(tok_dir)
    sep = tok._sp.piece_to_id("<|sep|>")
    assert sep == 4  # user-defined symbols follow unk/bos/eos/pad
    ids = tok.encode("a<|sep|>b")
    assert sep in ids
    assert AutoTokenizer.from_pretrained(str(tok_dir))("a<|sep|>b")["input_ids"] == [tok.bos_id] + ids


def test_unigram_model_also_matches_hf(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_corpus(300, seed=7))
    out = tmp_path / "uni"
    proc = run_cmd(
        [sys.executable, "-m", "tokenizer.train", "--input", str(corpus), "--vocab-size", "800",
         "--model-type", "unigram", "--output", str(out), "--sample-docs", "250"],
        timeout=180,
    )  # fmt: skip
    assert "HF parity ok" in proc.stdout
    meta = json.loads((out / "bigtrain_tokenizer.json").read_text())
    assert meta["model_type"] == "unigram" and meta["training"]["documents"] == 250
    assert_hf_parity_and_round_trip(out, held_out_lines())


def test_tokenizer_api(tok_dir: Path) -> None:
    by_dir = Tokenizer.load(tok_dir)
    by_file = Tokenizer.load(tok_dir / "tokenizer.model")
    assert by_dir.fingerprint == by_file.fingerprint
    assert by_dir.fingerprint == hashlib.sha256((tok_dir / "tokenizer.model").read_bytes()).hexdigest()
    assert (by_dir.bos_id, by_dir.eos_id, by_dir.pad_id, by_dir.eod_id) == (1, 2, 3, 2)
    assert by_dir.dir == tok_dir.resolve() and by_dir.model_path == (tok_dir / "tokenizer.model").resolve()
    texts = ["hello world", "中文 😀", "", "  x\ty  "]
    plain = [by_dir.encode(t) for t in texts]
    assert by_dir.encode_batch(texts) == plain
    assert by_dir.encode_batch(texts, add_bos=True, add_eos=True, num_threads=2) == [
        [1, *p, 2] for p in plain
    ]
    assert by_dir.encode("hi", add_eos=True)[-1] == by_dir.eod_id
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        Tokenizer.load(tok_dir.parent)


def test_import_is_cheap() -> None:
    code = "import sys, tokenizer; print(sorted(m for m in ('torch', 'transformers', 'megatron') if m in sys.modules))"
    assert run_cmd([sys.executable, "-c", code], timeout=60).stdout.strip() == "[]"


def test_train_rejects_missing_input(tmp_path: Path) -> None:
    proc = run_cmd(
        [sys.executable, "-m", "tokenizer.train", "--input", str(tmp_path / "nope.jsonl"), "--vocab-size", "500",
         "--output", str(tmp_path / "out")],
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "input file not found" in proc.stderr and "Traceback" not in proc.stderr
