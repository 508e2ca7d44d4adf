"""A Hugging Face tokenizer directory (Llama 3 / Qwen2.5-shaped) as bigtrain's tokenizer: ids equal
``AutoTokenizer``'s, preprocessing writes them (ids past 65535 included), fine-tuning and export read the
same files; a pre-tokenizer that transformers does not use is caught; bad directories are named."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cmd
from tests.tokenizer.corpus import make_corpus, write_jsonl
from tests.tokenizer.hf_dirs import LLAMA3_SPLIT, llama3_dir, mistral_dir, qwen2_dir
from tests.tokenizer.test_preprocess import preprocess_cmd, read_dataset
from tokenizer import SentencePieceTokenizer, Tokenizer, TokenizerError, export_files
from tokenizer.hf import PROBE_TEXTS, ParityError
from tokenizer.hf_backend import HFTokenizer, verify_parity

WIDE_EXTRA = 65_600  # added tokens that push the vocabulary past uint16
MIXED = [
    *PROBE_TEXTS,
    *make_corpus(30, seed=77),
    "a literal <|eot_id|> and <|im_end|> and <|extra_65599|> in text",
    "numbers 3.14159 2026-11-23 0xDEADBEEF 1234567890",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_tok")
    return {
        "llama3": llama3_dir(root / "llama3"),
        "qwen2": qwen2_dir(root / "qwen2"),
        "wide": qwen2_dir(root / "wide", extra_tokens=WIDE_EXTRA),
        "control": qwen2_dir(root / "control", split=LLAMA3_SPLIT),
        "mistral": mistral_dir(root / "mistral", root / "mistral_src"),
    }


def auto(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("name", ["llama3", "qwen2", "wide", "mistral"])
def test_ids_special_tokens_and_decode_equal_autotokenizer(dirs: dict[str, Path], name: str) -> None:
    tok, hf = Tokenizer.load(dirs[name]), auto(dirs[name])
    assert isinstance(tok, HFTokenizer) and tok.kind == "huggingface" and tok.dir == dirs[name].resolve()
    assert tok.vocab_size == len(hf)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == tuple(
        -1 if i is None else i for i in (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id)
    )
    with_specials = hf(MIXED)["input_ids"]
    assert [tok.encode_as_hf(t) for t in MIXED] == with_specials
    assert (
        tok.encode_batch(MIXED)
        == [tok.encode(t) for t in MIXED]
        == hf(MIXED, add_special_tokens=False)["input_ids"]
    )
    for text, ids in zip(MIXED, with_specials):
        # byte-level BPE decodes exactly; a dummy-prefix decoder strips a leading space, in transformers too
        assert tok.decode(tok.encode(text)) == text or (name == "mistral" and text[:1] == " ")
        assert tok.decode(np.array(ids)) == hf.decode(ids, clean_up_tokenization_spaces=False)
    assert verify_parity(tok, MIXED) == len(MIXED)
    if name == "llama3":  # BOS from tokenizer.json's post-processor; EOD is <|end_of_text|>; no pad
        assert tok.add_bos and all(ids[0] == tok.bos_id for ids in with_specials)
        assert tok.eod_id == hf.convert_tokens_to_ids("<|end_of_text|>") and tok.pad_id == -1
        assert tok.encode("<|eot_id|>") == [
            hf.convert_tokens_to_ids("<|eot_id|>")
        ]  # special strings are tokens
    elif name != "mistral":  # Qwen: no BOS at all, EOS = EOD = pad = <|endoftext|>
        assert not tok.add_bos and tok.bos_id == -1 and tok.eod_id == tok.pad_id == 600
        with pytest.raises(TokenizerError, match=r"tokenizer_config.json: the tokenizer has no bos_token"):
            tok.encode("x", add_bos=True)
    if name == "mistral":  # SentencePiece-based HF files: <s> added, no pad, byte fallback
        assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, -1) and tok.add_bos
    if name == "wide":
        assert tok.vocab_size == 600 + 3 + WIDE_EXTRA > 65535
        assert tok.encode("<|extra_65599|>") == [tok.vocab_size - 1]


def test_truncation_and_padding_saved_in_tokenizer_json_are_not_applied(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    """transformers truncates and pads only when a call asks; a tokenizer.json saved with both on must not
    cut or pad documents."""
    from tokenizers import Tokenizer as Backend

    copy = tmp_path / "truncating"
    shutil.copytree(dirs["llama3"], copy)
    backend = Backend.from_file(str(copy / "tokenizer.json"))
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=64, pad_id=0, pad_token="!")
    backend.save(str(copy / "tokenizer.json"))
    tok, text = Tokenizer.load(copy), MIXED[0]
    assert tok.encode_as_hf(text) == auto(copy)(text)["input_ids"] == auto(dirs["llama3"])(text)["input_ids"]
    assert len(tok.encode_as_hf(text)) > 4 and tok.encode_documents([b"hi"])[0].size < 64


def test_data_tokenizer_facts_for_megatron(dirs: dict[str, Path]) -> None:
    """What bigtrain.data hands megatron-core: EOD, pad (None when the tokenizer has none), vocab."""
    from bigtrain.data.datasets import TokenizerInfo

    llama, qwen = (
        TokenizerInfo.from_tokenizer(Tokenizer.load(dirs["llama3"])),
        TokenizerInfo.from_tokenizer(Tokenizer.load(dirs["qwen2"])),
    )
    assert (llama.eod, llama.unique_identifiers["pad"], llama.vocab_size) == (701, None, 711)
    assert (qwen.eod, qwen.pad, qwen.vocab_size) == (600, 600, 603)


@pytest.mark.parametrize("name", ["llama3", "wide"])
def test_preprocess_writes_the_autotokenizer_ids(dirs: dict[str, Path], name: str, tmp_path: Path) -> None:
    """Each document is ``AutoTokenizer(text)["input_ids"]`` + EOD: Llama 3 starts it with BOS, Qwen does
    not; past 65535 ids the dataset is int32 and the high ids read back exactly."""
    docs = [d for d in MIXED if d.strip()]
    inputs = write_jsonl(tmp_path / "docs.jsonl", docs)
    prefix = tmp_path / "out" / name
    proc = run_cmd(preprocess_cmd([str(inputs)], dirs[name], prefix, "--workers", "2"), timeout=240)
    tok, hf = Tokenizer.load(dirs[name]), auto(dirs[name])
    assert f"documents end with EOD id {tok.eod_id}" in proc.stderr
    want = [ids + [tok.eod_id] for ids in hf(docs)["input_ids"]]
    got = [a.tolist() for a in read_dataset(prefix)]
    assert got == want
    meta = json.loads(prefix.with_suffix(".meta.json").read_text())
    assert (meta["tokenizer_fingerprint"], meta["vocab_size"], meta["eod_id"], meta["bos_id"]) == (
        tok.fingerprint, tok.vocab_size, tok.eod_id, tok.bos_id
    )  # fmt: skip
    if name == "llama3":
        assert meta["dtype"] == "uint16" and all(ids[0] == tok.bos_id for ids in got)
    else:
        assert meta["dtype"] == "int32" and max(max(ids) for ids in got) == tok.vocab_size - 1 > 65535


def test_control_a_pretokenizer_transformers_does_not_use_is_caught(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    """tokenizer.json splits digits in threes (Llama 3's regex) but names Qwen2Tokenizer, which rebuilds
    its pipeline with single digits: the ids really differ, parity and preprocess refuse it."""
    tok, hf = Tokenizer.load(dirs["control"]), auto(dirs["control"])
    text = "numbers 3.14159 2026-11-23 0xDEADBEEF 1234567890"
    assert tok.encode_as_hf(text) != hf(text)["input_ids"]
    with pytest.raises(ParityError, match=r"differ from transformers' Qwen2Tokenizer"):
        verify_parity(tok, [text])
    inputs = write_jsonl(tmp_path / "docs.jsonl", [text])
    prefix = tmp_path / "out" / "control"
    proc = run_cmd(preprocess_cmd([str(inputs)], dirs["control"], prefix), timeout=240, check=False)
    assert proc.returncode == 2 and "differ from transformers' Qwen2Tokenizer" in proc.stderr
    assert not prefix.parent.exists() or not any(prefix.parent.iterdir())


def test_bad_directories_are_named(dirs: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{empty} has no tokenizer.model .* and no tokenizer.json"):
        Tokenizer.load(empty)
    inputs = write_jsonl(tmp_path / "docs.jsonl", ["hello"])
    proc = run_cmd(preprocess_cmd([str(inputs)], empty, tmp_path / "out" / "x"), timeout=120, check=False)
    assert proc.returncode == 2 and f"{empty} has no tokenizer.model" in proc.stderr

    broken = tmp_path / "broken"
    shutil.copytree(dirs["llama3"], broken)
    config_file = broken / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "eos_token": "<|not_a_token|>"}))
    with pytest.raises(
        TokenizerError, match=r"tokenizer_config.json eos_token: '<\|not_a_token\|>' is not a token"
    ):
        Tokenizer.load(broken)
    config_file.write_text(json.dumps({**config, "eos_token": None}))
    with pytest.raises(TokenizerError, match=r"has no eos_token"):
        _ = Tokenizer.load(broken).eod_id
    (broken / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a Hugging Face tokenizers file"):
        Tokenizer.load(broken)

    # an HF slow tokenizer (Llama-2 style: tokenizer.model + tokenizer_config.json, no tokenizer.json):
    # the bare SentencePiece model would drop the BOS transformers adds; refused instead
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy2(dirs["mistral"] / name, slow / name)
    with pytest.raises(TokenizerError, match=rf"{slow}: a Hugging Face tokenizer .* without tokenizer.json"):
        Tokenizer.load(slow)
    proc = run_cmd(preprocess_cmd([str(inputs)], slow, tmp_path / "out" / "y"), timeout=120, check=False)
    assert proc.returncode == 2 and "without tokenizer.json" in proc.stderr, proc.stderr[-2000:]


def test_backend_choice_keeps_tokenizer_train_directories_on_sentencepiece(
    tok_dir: Path, tmp_path: Path
) -> None:
    """tokenizer.train output (tokenizer.json beside tokenizer.model and bigtrain_tokenizer.json) stays
    SentencePiece; the same HF files without the model are read by the HF backend, with the same ids."""
    import hashlib

    sp = Tokenizer.load(tok_dir)
    assert isinstance(sp, SentencePieceTokenizer) and sp.kind == "sentencepiece"
    assert sp.fingerprint == hashlib.sha256((tok_dir / "tokenizer.model").read_bytes()).hexdigest()
    hf_only = tmp_path / "hf_only"
    hf_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tok_dir / name, hf_only / name)
    hf = Tokenizer.load(hf_only)
    assert isinstance(hf, HFTokenizer) and (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id, hf.unk_id) == (
        sp.vocab_size, sp.bos_id, sp.eos_id, sp.pad_id, sp.unk_id
    )  # fmt: skip
    texts = [t for t in MIXED if "<" not in t]  # SentencePiece reads special-token strings as text
    assert [hf.encode_as_hf(t) for t in texts] == [sp.encode_as_hf(t) for t in texts]


def test_export_files_copies_the_tokenizer_unchanged(
    dirs: dict[str, Path], tok_dir: Path, tmp_path: Path
) -> None:
    for name, src in (("llama3", dirs["llama3"]), ("sentencepiece", tok_dir)):
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text("{}")  # what the export wrote before stays
        copied = export_files(src, out)
        assert {p.name for p in copied} == {p.name for p in src.iterdir() if p.is_file()} - {"train.jsonl"}
        assert all(filecmp.cmp(src / p.name, p, shallow=False) for p in copied)
        assert (out / "config.json").read_text() == "{}"
        assert Tokenizer.load(out).fingerprint == Tokenizer.load(src).fingerprint
        assert auto(out)(MIXED)["input_ids"] == auto(src)(MIXED)["input_ids"]


def test_fine_tuning_reads_the_chat_template_and_fingerprint(dirs: dict[str, Path], tmp_path: Path) -> None:
    """SFT's ChatTemplate on an HF directory: the ids apply_chat_template gives, replies trained up to the
    family's end-of-turn token; storing another template leaves the data fingerprint alone."""
    from bigtrain.finetune import data as d

    conversation = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Four."}]
    for name, end in (("llama3", "<|eot_id|>"), ("qwen2", "<|im_end|>")):
        chat, hf = d.ChatTemplate(dirs[name]), auto(dirs[name])
        example = chat.encode(conversation)
        assert example.tokens == list(hf.apply_chat_template(conversation, tokenize=True)["input_ids"])
        assert chat.end_of_turn_ids() == [hf.convert_tokens_to_ids(end)]
        assert d.template_record(chat)["tokenizer_fingerprint"] == Tokenizer.load(dirs[name]).fingerprint
    copy = tmp_path / "llama3"
    shutil.copytree(dirs["llama3"], copy)
    d.save_chat_template(copy)  # bigtrain's default template, into tokenizer_config.json
    assert Tokenizer.load(copy).fingerprint == Tokenizer.load(dirs["llama3"]).fingerprint
    assert d.current_template(copy) == d.DEFAULT_CHAT_TEMPLATE
