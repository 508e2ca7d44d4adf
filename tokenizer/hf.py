"""Hugging Face files for a SentencePiece model, built from the model proto and verified id for id.

Why not ``LlamaTokenizer(vocab_file=...)``: with transformers 5.x it builds without complaint and
then encodes every text as ``[BOS]``. Instead the fast tokenizer (``tokenizer.json``) is assembled
here from the pieces, scores and types in ``tokenizer.model``:

* normalizer: only " " -> "▁" (the model is trained with identity normalization and no dummy
  prefix, see :mod:`tokenizer.train`), so HF and SentencePiece see the same string;
* model: BPE with merges recovered from the vocabulary (a merge ``(a, b)`` exists when ``a``,
  ``b`` and ``a+b`` are normal pieces; its rank is the SentencePiece score of ``a+b``, which is
  exactly the priority SentencePiece's BPE uses), or Unigram with the piece scores; both with
  byte fallback. Control / byte / unused pieces get no merges (BPE) or a prohibitive score
  (Unigram) so that text like ``"<0x41>"`` or ``"<s>"`` is never read as those ids, as in
  SentencePiece (for Unigram this relies on the characters of those names being in the
  vocabulary, which :func:`tokenizer.train.required_chars` ensures);
* user-defined symbols (``--special-tokens``) become always-matched added tokens, as in
  SentencePiece; BOS/EOS/UNK/PAD are special tokens. As in every HF Llama tokenizer their strings
  are read as those tokens (``split_special_tokens`` false): a chat template's ``{{ eos_token }}``
  must become the EOS id in ``apply_chat_template(..., tokenize=True)``, which is what fine-tuning
  trains on. SentencePiece reads a literal "<s>" in text as text; ``split_special_tokens=True``
  in the call does the same in transformers;
* post-processor: BOS is prepended (``add_bos_token=True``, like Llama), so
  ``AutoTokenizer(...)(text, split_special_tokens=True)["input_ids"] == Tokenizer.encode(text,
  add_bos=True)`` for every text, and without the flag for every text without special-token strings
  (``apply_chat_template`` adds no BOS of its own: the template decides). A model with BERT's
  specials (``tokenizer.train --bert-specials``) gets BERT's instead: ``[CLS] $A [SEP]`` and
  ``[CLS] $A [SEP] $B:1 [SEP]:1`` (token types 0 then 1), no BOS, and ``cls_token`` / ``sep_token`` /
  ``mask_token`` in ``tokenizer_config.json`` (the ``fill-mask`` pipeline reads ``mask_token``):
  ``Tokenizer.encode_as_hf`` is ``[CLS]`` + ids + ``[SEP]``, and a pair is what the bert dataset
  (:mod:`bigtrain.data.bert`) builds from the same two texts.

:func:`verify_parity` loads the written directory with ``transformers.AutoTokenizer`` and
compares ids with SentencePiece; training calls it and fails loudly on any difference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizer import BERT_SPECIALS

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
CONTROL, USER_DEFINED = _CONTROL, _USER_DEFINED
# sentencepiece TrainerSpec.ModelType
_UNIGRAM, _BPE = 1, 2
_NEVER = -1e9  # Unigram score that keeps a piece out of every segmentation

# Texts that stress the spots where a converted tokenizer usually drifts from SentencePiece.
PROBE_TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, trailing spaces   ",
    "multiple     inner    spaces\nand\n\nnewlines\n",
    "\ttab\tseparated\tvalues\t\n\t\tindented",
    "def add(a: int, b: int) -> int:\n    return a + b  # 1234567890\n",
    'if (x != y && z >= 0) { printf("%d\\n", x); }',
    "中文分词测试：你好，世界！",
    "日本語のテキストと한국어 텍스트",
    "emoji 😀🚀👍🏽 and flags 🇫🇷",
    "Ünïcödé àccents — “quotes” … ellipsis",
    "literal control-looking text: <s> </s> <unk> <pad> <0x41>",
    " ",
    "\n",
    "",
    "   \n\t  \n",
)


class ParityError(RuntimeError):
    """The Hugging Face tokenizer encodes some text differently from the SentencePiece model."""


@dataclass(frozen=True)
class SpecialTokens:
    unk: str
    bos: str
    eos: str
    pad: str
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    bert: dict[str, int] | None = None  # {"[CLS]": id, "[SEP]": id, "[MASK]": id} when all three exist


def load_model_proto(model_bytes: bytes) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    # the generated protobuf module builds ModelProto at import time, so mypy cannot see it
    return sentencepiece_model_pb2.ModelProto.FromString(model_bytes)  # type: ignore[attr-defined]


def special_tokens(proto: Any) -> SpecialTokens:
    """The piece strings and ids of unk/bos/eos/pad as recorded in the trainer spec."""
    spec = proto.trainer_spec
    ids = (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id)
    if min(ids) < 0:
        raise ValueError(f"model must define unk, bos, eos and pad ids, got {ids}")
    unk, bos, eos, pad = (proto.pieces[i].piece for i in ids)
    found = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (_CONTROL, _USER_DEFINED)}
    bert = {t: found[t] for t in BERT_SPECIALS} if all(t in found for t in BERT_SPECIALS) else None
    return SpecialTokens(unk, bos, eos, pad, *ids, bert=bert)


def build_fast_tokenizer(model_bytes: bytes) -> Any:
    """A ``tokenizers.Tokenizer`` encoding exactly like the SentencePiece model (see module doc)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    proto = load_model_proto(model_bytes)
    _check_supported(proto)
    special = special_tokens(proto)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    model: models.Model
    if proto.trainer_spec.model_type == _BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab, merges=bpe_merges(pieces), unk_token=special.unk, byte_fallback=True, fuse_unk=True
        )
    else:
        scored = [(piece, score if kind == _NORMAL else _NEVER) for piece, score, kind in pieces]
        model = models.Unigram(scored, unk_id=special.unk_id, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # BERT's [MASK] swallows the space before it (as ALBERT's export does): a masked word in training is
    # one piece ("▁word" -> [MASK]), so "a [MASK] b" must not leave a lone "▁" before the mask
    mask = "[MASK]" if special.bert is not None else None
    tok.add_special_tokens(
        [
            AddedToken(p, special=True, normalized=False, lstrip=p == mask)
            for p, _, k in pieces
            if k in (_UNKNOWN, _CONTROL)
        ]
    )
    tok.add_tokens(
        [AddedToken(p, special=False, normalized=False) for p, _, k in pieces if k == _USER_DEFINED]
    )
    if special.bert is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", special.bert["[CLS]"]), ("[SEP]", special.bert["[SEP]"])],
        )
        return tok
    tok.post_processor = processors.TemplateProcessing(
        single=f"{special.bos} $A",
        pair=f"{special.bos} $A {special.bos} $B",
        special_tokens=[(special.bos, special.bos_id)],
    )
    return tok


def bpe_merges(pieces: Sequence[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary, highest-priority first.

    SentencePiece BPE repeatedly joins the adjacent pair whose union has the highest score, so
    ranking every split ``(a, b)`` of a normal piece by that piece's score (then by id, to make
    ties deterministic) reproduces its choices in a merge-rank BPE.
    """
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked = []
    for piece, (score, pid) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, pid, normal[left][1], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _check_supported(proto: Any) -> None:
    """Refuse configurations whose HF equivalent is not implemented, rather than drift silently."""
    norm = proto.normalizer_spec
    problems = []
    if proto.trainer_spec.model_type not in (_BPE, _UNIGRAM):
        problems.append("model type must be bpe or unigram")
    if not proto.trainer_spec.byte_fallback:
        problems.append("byte_fallback must be on")
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        problems.append("normalization must be identity without dummy prefix or whitespace removal")
    if problems:
        raise ValueError("cannot export this SentencePiece model to Hugging Face: " + "; ".join(problems))


def write_hf_files(out_dir: Path, model_bytes: bytes) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json next to the model.

    The files reference nothing outside ``out_dir``, so copying the directory's files next to
    exported weights yields a loadable HF tokenizer there too.
    """
    proto = load_model_proto(model_bytes)
    special = special_tokens(proto)
    build_fast_tokenizer(model_bytes).save(str(out_dir / "tokenizer.json"))
    names = {
        "bos_token": special.bos,
        "eos_token": special.eos,
        "unk_token": special.unk,
        "pad_token": special.pad,
    }
    if special.bert is not None:  # the BERT post-processor adds [CLS]/[SEP] (see module doc)
        names |= {"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": special.bert is None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,  # chat templates' special tokens are tokens (see module doc)
        "padding_side": "right",
    }
    if special.bert is not None:  # PreTrainedTokenizerFast returns token types only when told to
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", names)


def verify_parity(out_dir: Path, texts: Sequence[str]) -> int:
    """Compare ``AutoTokenizer.from_pretrained(out_dir)`` with SentencePiece on ``texts``.

    Returns the number of texts checked; raises :class:`ParityError` describing the first
    mismatch. Loading through transformers (not just ``tokenizers``) is the point: it is what
    every consumer of the export does, config files included.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(out_dir))
    texts = list(texts)
    got_all = hf(texts, split_special_tokens=True)["input_ids"]  # literal "<s>" as text, like SentencePiece
    special = special_tokens(load_model_proto((out_dir / "tokenizer.model").read_bytes()))
    if special.bert is None:
        want_all = sp.encode(texts, add_bos=True)
    else:
        cls, sep = special.bert["[CLS]"], special.bert["[SEP]"]
        want_all = [[cls, *ids, sep] for ids in sp.encode(texts)]
        _verify_bert_pair(hf, sp, special.bert)
    specials = [special.bos, special.eos, special.unk, special.pad, *(special.bert or {})]
    got = hf("".join(specials), add_special_tokens=False)["input_ids"]
    want = [special.bos_id, special.eos_id, special.unk_id, special.pad_id, *(special.bert or {}).values()]
    if got != want:  # what a chat template's {{ bos_token }} / {{ eos_token }} become
        raise ParityError(
            f"HF tokenizer reads the special-token strings {specials} as {got}, expected {want}"
        )
    for text, got, want in zip(texts, got_all, want_all):
        if got != want:
            at = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
            raise ParityError(
                f"HF tokenizer differs from SentencePiece on {text[:80]!r}: first difference at token {at}: "
                f"hf={got[at : at + 8]} sentencepiece={want[at : at + 8]}"
            )
    return len(texts)


def _verify_bert_pair(hf: Any, sp: Any, bert: dict[str, int]) -> None:
    """A sentence pair and the named tokens, as BERT's tokenizer gives them (see module doc)."""
    a, b = PROBE_TEXTS[0], PROBE_TEXTS[6]
    cls, sep = bert["[CLS]"], bert["[SEP]"]
    ids_a, ids_b = sp.encode(a), sp.encode(b)
    want_ids = [cls, *ids_a, sep, *ids_b, sep]
    want_types = [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    enc = hf(a, b, split_special_tokens=True)
    if enc["input_ids"] != want_ids or enc["token_type_ids"] != want_types:
        raise ParityError(
            f"HF tokenizer encodes the pair ({a[:30]!r}, {b[:30]!r}) as {enc['input_ids'][:8]}... types "
            f"{enc['token_type_ids'][:8]}..., expected [CLS] A [SEP] B [SEP] with types 0/1"
        )
    named = {name: getattr(hf, f"{name}_token_id") for name in ("cls", "sep", "mask")}
    if named != {"cls": cls, "sep": sep, "mask": bert["[MASK]"]}:
        raise ParityError(f"HF tokenizer's cls/sep/mask token ids are {named}, expected {bert}")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
