"""Train the bigtrain SentencePiece tokenizer and write it with its Hugging Face twin.

    python -m tokenizer.train --input data/*.jsonl --vocab-size 32000 --output tok/

Settings, and why (all recorded in ``bigtrain_tokenizer.json``):

* ``byte_fallback``: characters outside the vocabulary become their UTF-8 bytes, so no input
  (CJK, emoji, binary-looking junk) ever maps to ``<unk>``;
* identity normalization, no dummy prefix, ``remove_extra_whitespaces=False``: the model sees
  the text exactly as written, so ``decode(encode(x)) == x`` for code and whitespace, and the HF
  tokenizer needs no prefix-space logic (which is where converted tokenizers usually drift).
  NFKC was rejected because it rewrites characters (full-width forms, ligatures) and breaks the
  round trip. The cost of no dummy prefix: the first word of a text is tokenized without the
  leading "▁", unlike the same word mid-sentence. One character cannot round trip: U+2581 "▁"
  itself decodes as a space, as in every SentencePiece model;
* ``split_digits``: numbers are read digit by digit (better arithmetic, no number-shaped pieces);
* ``allow_whitespace_only_pieces``: runs of spaces (code indentation) get their own pieces;
* ids unk=0, bos=1, eos=2, pad=3; ``--special-tokens`` become user-defined symbols right after;
* ``--bert-specials`` (a tokenizer for the bert family): BERT's ``[CLS] [SEP] [MASK]`` as control
  symbols, ids 4, 5, 6 (the pad is ``<pad>``, id 3). Control, not user-defined: a literal "[MASK]" in
  a training document stays text, as "<s>" does, so only the dataset puts these ids in a sample. The
  HF files then encode as BERT's do (``[CLS] A [SEP] B [SEP]`` with token types 0/1, no BOS; see
  :mod:`tokenizer.hf`).

A file that cannot be read to its end (truncated or corrupt compressed data, an I/O error) keeps the
documents read before the failure and is named, with the line, in a warning and in the metadata; with
``--strict`` it stops the run, as does the first bad line.

Documents are fed as chunks of whole lines of at most ``--max-sentence-bytes`` (SentencePiece
skips longer "sentences"), keeping newlines and tabs so they are learned like any character.
``--sample-docs K`` keeps a uniform reservoir sample of K documents (seeded, so reproducible)
over all inputs, which stays representative when inputs are ordered by source; the inputs are
still streamed once in full. At the end the HF files are loaded back with
``transformers.AutoTokenizer`` and checked id for id against SentencePiece on a sample of the
training documents plus a fixed mixed-language probe; any difference fails the command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizer import BERT_SPECIALS, BOS_ID, EOS_ID, META_FILE, MODEL_FILE, PAD_ID, UNK_ID, Tokenizer
from tokenizer.io import InputError, SkipCounter, check_output_dir, expand_inputs, iter_documents

CHECK_DOCS = 256  # training documents re-encoded for the HF parity check
CHECK_BYTES = 4 << 20  # ... at most this many bytes of them


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokenizer.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help=".jsonl, .jsonl.gz or .txt files or globs")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, type=Path, help="directory for tokenizer.model + HF files")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--json-key", default="text", help="field holding the text in JSONL inputs")
    p.add_argument("--sample-docs", type=int, default=0, help="train on a reservoir sample of K documents")
    p.add_argument(
        "--special-tokens", nargs="*", default=[], help="extra always-matched tokens, e.g. <|im_start|>"
    )
    p.add_argument(
        "--bert-specials",
        action="store_true",
        help="add BERT's [CLS] [SEP] [MASK] (control symbols) and write BERT-style HF files (bert family)",
    )
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentence-bytes", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0, help="seed of the document sample")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad line or unreadable file (file:line: reason)",
    )
    args = p.parse_args(argv)
    if args.vocab_size < 300:
        p.error("--vocab-size must be at least 300 (256 byte pieces + special tokens + some merges)")
    if args.sample_docs < 0:
        p.error("--sample-docs must be >= 0")
    bad = [t for t in args.special_tokens if not t or any(c.isspace() for c in t)]
    if args.bert_specials:
        bad += [t for t in args.special_tokens if t in BERT_SPECIALS]
    if bad or len(set(args.special_tokens)) != len(args.special_tokens):
        p.error(
            f"--special-tokens must be distinct, contain no whitespace and not repeat --bert-specials: "
            f"{args.special_tokens}"
        )
    return args


def reservoir_sample(items: Iterable[Any], k: int, seed: int) -> list[Any]:
    """A uniform sample of ``k`` items in their original order, in one pass with O(k) memory."""
    rng = random.Random(seed)
    sample: list[tuple[int, Any]] = []
    for i, item in enumerate(items):
        if i < k:
            sample.append((i, item))
        else:
            j = rng.randint(0, i)
            if j < k:
                sample[j] = (i, item)
    return [item for _, item in sorted(sample, key=lambda pair: pair[0])]


def sentences(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Cut documents into runs of whole lines of at most ``max_bytes`` UTF-8 bytes.

    A single line longer than that is cut every ``max_bytes // 4`` characters (a character is at
    most 4 bytes), so nothing is dropped by SentencePiece's sentence-length limit.
    """
    for doc in docs:
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if buf and size + n > max_bytes:
                yield "".join(buf)
                buf, size = [], 0
            if n > max_bytes:
                step = max_bytes // 4
                yield from (line[i : i + step] for i in range(0, len(line), step))
                continue
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


class _Tap:
    """Passes documents through while counting them and keeping the first few for the parity check.

    An exception raised while reading is kept in ``error``: SentencePiece's trainer, which drives the
    iteration, reports it only as ``INTERNAL: <class name>``, without the message naming the file.
    """

    def __init__(self, docs: Iterable[str]) -> None:
        self._docs = docs
        self.count = 0
        self.bytes = 0
        self.kept: list[str] = []
        self._kept_bytes = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for doc in self._docs:
                self.count += 1
                n = len(doc.encode("utf-8"))
                self.bytes += n
                if len(self.kept) < CHECK_DOCS and self._kept_bytes + n <= CHECK_BYTES:
                    self.kept.append(doc)
                    self._kept_bytes += n
                yield doc
        except Exception as e:
            self.error = e
            raise


def required_chars(special_tokens: Sequence[str]) -> str:
    """Characters of the reserved piece names ("<s>", "<0x41>", ...) and of the special tokens.

    Keeping them in the vocabulary matters for the HF Unigram model: it can match a reserved
    piece spelled out literally in text (SentencePiece cannot), and it prefers doing so to
    using byte fallback for a missing character. With these characters present the normal
    pieces always win, as in SentencePiece.
    """
    names = ["<unk>", "<s>", "</s>", "<pad>", "<0x0123456789ABCDEF>", *special_tokens]
    return "".join(sorted(set("".join(names))))


def train_model(args: argparse.Namespace, sentence_iter: Iterator[str]) -> bytes:
    """Run the SentencePiece trainer on ``sentence_iter`` and return the serialized model."""
    import sentencepiece as spm

    model = io.BytesIO()
    bert: dict[str, Any] = {}
    if getattr(args, "bert_specials", False):  # only then: other models' bytes stay as they were
        bert = {"control_symbols": list(BERT_SPECIALS)}
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentence_iter,
        model_writer=model,
        model_type=args.model_type,
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        max_sentence_length=args.max_sentence_bytes,
        user_defined_symbols=list(args.special_tokens),
        required_chars=required_chars([*args.special_tokens, *bert.get("control_symbols", [])]),
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        num_threads=args.threads,
        minloglevel=0 if args.verbose else 2,
        **bert,
    )
    return model.getvalue()


def check_round_trip(tok: Tokenizer, texts: Sequence[str]) -> None:
    """decode(encode(x)) == x and no <unk>: the guarantees the settings above are chosen for."""
    for text in texts:
        ids = tok.encode(text)
        if tok.unk_id in ids:
            raise RuntimeError(f"tokenizer produced <unk> for {text[:80]!r}: byte fallback is not working")
        if tok.decode(ids) != text:
            raise RuntimeError(f"tokenizer does not round trip {text[:80]!r}")


def write_meta(out: Path, tok: Tokenizer, args: argparse.Namespace, stats: dict[str, Any]) -> None:
    """``bigtrain_tokenizer.json``: what the model is and how it was made, for humans and tools."""
    import sentencepiece
    import tokenizers
    import transformers

    meta = {
        "vocab_size": tok.vocab_size,
        "unk_id": tok.unk_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "eod_id": tok.eod_id,
        "special_tokens": list(args.special_tokens),
        **({"bert_specials": list(BERT_SPECIALS)} if args.bert_specials else {}),
        "model_type": args.model_type,
        "fingerprint": tok.fingerprint,
        "normalization": "identity",
        "add_dummy_prefix": False,
        "byte_fallback": True,
        "hf_add_bos": not args.bert_specials,  # BERT's files add [CLS]/[SEP] instead
        "training": {
            "inputs": [str(p) for p in args.input],
            "json_key": args.json_key,
            "sample_docs": args.sample_docs,
            "seed": args.seed,
            "character_coverage": args.character_coverage,
            "max_sentence_bytes": args.max_sentence_bytes,
            **stats,
        },
        "versions": {
            "sentencepiece": sentencepiece.__version__,
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
        },
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tokenizer import hf

    t0 = time.monotonic()
    try:
        check_output_dir(args.output, "--output")
        paths = expand_inputs(args.input)
    except InputError as e:
        print(f"tokenizer.train: error: {e}", file=sys.stderr)
        return 2
    skips = SkipCounter(strict=args.strict)
    docs: Iterable[str] = (
        d.decode("utf-8") for d in iter_documents(paths, args.json_key, skips, skips.read_error)
    )
    try:
        if args.sample_docs:
            docs = reservoir_sample(docs, args.sample_docs, args.seed)
        tap = _Tap(docs)
        try:
            model_bytes = train_model(args, sentences(tap, args.max_sentence_bytes))
        except RuntimeError as e:
            if isinstance(tap.error, InputError):
                raise tap.error from None
            if tap.error is not None:
                raise RuntimeError(f"reading the input failed: {tap.error!r}") from tap.error
            reason = "no documents to train on" if tap.count == 0 else f"sentencepiece failed: {e}"
            raise InputError(reason + "".join(f"; {r.describe()}" for r in skips.read_errors)) from None
    except InputError as e:
        print(f"tokenizer.train: error: {e}", file=sys.stderr)
        return 1
    for error in skips.read_errors:
        print(f"tokenizer.train: warning: {error.describe()}", file=sys.stderr)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(model_bytes)
    tok = Tokenizer.load(out)
    hf.write_hf_files(out, model_bytes)
    probe = list(hf.PROBE_TEXTS) + [f"a{t}b {t} {t}{t}" for t in args.special_tokens]
    probe += [f"literal {t} in text" for t in BERT_SPECIALS] if args.bert_specials else []
    try:
        check_round_trip(tok, tap.kept + probe)
        checked = hf.verify_parity(out, tap.kept + probe)
    except (hf.ParityError, RuntimeError) as e:
        for name in hf.HF_FILES:
            (out / name).unlink(missing_ok=True)
        print(f"tokenizer.train: error: {e} (HF files removed)", file=sys.stderr)
        return 1
    stats = {
        "documents": tap.count,
        "bytes": tap.bytes,
        "skipped": skips.counts,
        "read_errors": skips.read_error_records(),
        "parity_checked_texts": checked,
    }
    write_meta(out, tok, args, stats)
    print(
        f"tokenizer.train: {args.model_type} vocab={tok.vocab_size} from {tap.count} documents "
        f"({tap.bytes / 1e6:.1f} MB), skipped {skips.describe()}, HF parity ok on {checked} texts, "
        f"{time.monotonic() - t0:.1f}s -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
