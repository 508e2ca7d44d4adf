"""Tokenize JSONL / JSONL.gz / TXT documents into megatron-core indexed datasets.

    python -m tokenizer.preprocess --input 'data/*.jsonl.gz' --tokenizer tok/ --output-prefix out/web \\
        [--workers N] [--shard-size-tokens T] [--strict] [--summary-json summary.json]

Pipeline (measured to keep both cores on SentencePiece; see BENCHMARKS.md):

* the main thread streams input lines, validates them and groups documents into chunks of about
  ``--chunk-bytes`` of text;
* ``--workers`` threads each encode one chunk at a time with the tokenizer's batch encoder
  (SentencePiece's C++ or ``tokenizers``' Rust, GIL released) into int32 numpy arrays, EOD appended
  (``Tokenizer.encode_documents``: no BOS for a SentencePiece tokenizer; a Hugging Face one's
  ``tokenizer(text)`` ids, BOS by its own rules, then EOD). Several
  chunks in flight keep all workers busy even when one chunk holds a huge document; results are
  consumed in submission order, so documents keep their input order;
* the main thread converts them (uint16 below 65500 ids, else int32) and queues them for an
  ``IndexedDatasetBuilder`` in a child process, started first thing: its megatron-core import
  (seconds) overlaps the encoding instead of delaying it (see :mod:`tokenizer.builder_proc`).
  Chunks in flight and the queue (128 MiB) are bounded, so memory stays flat for any input size.

With ``--split-sentences`` (data for the bert family) each document is written as its sentences, one
sequence each, without EOD (:mod:`tokenizer.sentences` says how text is cut); the tokenizer then needs
BERT's ``[CLS]``/``[SEP]``/``[MASK]`` and a pad (``tokenizer.train --bert-specials``), checked first.

A Hugging Face tokenizer is first compared with ``transformers.AutoTokenizer`` on
:data:`tokenizer.hf.PROBE_TEXTS` (:func:`tokenizer.hf_backend.verify_parity`; a few seconds, while the
builder process starts); a difference stops the run before anything is written.

Bad lines are skipped and counted by reason, or with ``--strict`` the first one stops the run
with ``file:line: reason`` and exit status 1. A file that cannot be read to its end (truncated or
corrupt compressed data, an I/O error) keeps the documents read before the failure, is named with
the line in a warning and in the summary (``read_errors``), and the other files follow; with
``--strict`` it stops the run the same way. Usage errors (missing input, empty glob, no
tokenizer, a Hugging Face tokenizer without EOS or failing its parity check) exit with status 2. Output is written under temporary names and renamed only when
complete, with ``PREFIX.meta.json`` written last (fingerprint, vocab size, dtype, counts, inputs,
shards); see :mod:`tokenizer.writer`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tokenizer import Tokenizer, TokenizerError, bert_specials_hint
from tokenizer.builder_proc import cpu_seconds
from tokenizer.hf import PROBE_TEXTS, ParityError
from tokenizer.hf_backend import HFTokenizer, verify_parity
from tokenizer.io import (
    BadLineError,
    InputError,
    SkipCounter,
    check_output_dir,
    expand_inputs,
    iter_documents,
)
from tokenizer.sentences import encode_sentence_documents
from tokenizer.writer import BuilderProcess, DatasetWriter, choose_dtype, document_size

T = TypeVar("T")
R = TypeVar("R")


def process_start_time() -> float:
    """``time.monotonic()`` at which this process was created, so start-up costs count too.

    Read from /proc (10 ms resolution); elsewhere falls back to the current time.
    """
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks
        return time.monotonic() - max(age, 0.0)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokenizer.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input", nargs="+", required=True, help=".jsonl, .jsonl.gz, .txt files or globs (sorted)"
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="directory with tokenizer.model (tokenizer.train) or tokenizer.json (Hugging Face), or the file",
    )
    p.add_argument(
        "--output-prefix", required=True, help="writes PREFIX.bin/.idx (or PREFIX_00000...) + .meta.json"
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="encoding threads (default: all cores)"
    )
    p.add_argument("--json-key", default="text")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad line or unreadable file (file:line: reason)",
    )
    p.add_argument("--shard-size-tokens", type=int, default=0, help="start a new shard after T tokens")
    p.add_argument("--log-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--summary-json", type=Path, help="also write the final summary here as JSON")
    p.add_argument(
        "--split-sentences",
        action="store_true",
        help="write each document as its sentences, no EOD: the bert family's sentence-pair data",
    )
    p.add_argument("--chunk-bytes", type=int, default=256 << 10, help="text bytes per encoding task")
    args = p.parse_args(argv)
    if args.workers < 1 or args.chunk_bytes < 1 or args.shard_size_tokens < 0 or args.log_interval <= 0:
        p.error("--workers and --chunk-bytes must be >= 1, --shard-size-tokens >= 0, --log-interval > 0")
    return args


def chunked(docs: Iterable[bytes], chunk_bytes: int, first_bytes: int = 64 << 10) -> Iterator[list[bytes]]:
    """Consecutive groups of documents holding about ``chunk_bytes`` of text (at least one document).

    The first groups are smaller (``first_bytes``, doubling up to ``chunk_bytes``) so the first
    tokens come out after a few milliseconds of encoding, not after a full chunk.
    """
    chunk: list[bytes] = []
    size = 0
    target = min(first_bytes, chunk_bytes)
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= target:
            yield chunk
            chunk, size = [], 0
            target = min(2 * target, chunk_bytes)
    if chunk:
        yield chunk


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], pool: Executor, in_flight: int
) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in input order, with at most ``in_flight`` calls queued or running."""
    window: deque[tuple[T, Any]] = deque()
    for item in items:
        window.append((item, pool.submit(fn, item)))
        if len(window) >= in_flight:
            first, future = window.popleft()
            yield first, future.result()
    while window:
        first, future = window.popleft()
        yield first, future.result()


@dataclass
class Stats:
    """Counters and timestamps (``time.monotonic()``) of one run; the summary is derived from them."""

    started: float
    main_at: float = field(default_factory=time.monotonic)
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    first_doc_at: float | None = None
    ready_bytes: int | None = None  # text bytes encoded when the builder import had finished
    ready_tokens: int | None = None
    ready_at: float | None = None
    ended: float | None = None

    def add(self, docs: int, tokens: int, nbytes: int) -> None:
        if self.first_doc_at is None:
            self.first_doc_at = time.monotonic()
        self.documents += docs
        self.tokens += tokens
        self.text_bytes += nbytes

    def mark_ready(self, at: float) -> None:
        if self.ready_at is None:
            self.ready_at, self.ready_bytes, self.ready_tokens = at, self.text_bytes, self.tokens

    def rate(self, now: float | None = None) -> float:
        """Text MB/s since reading started (process start-up excluded, import contention included)."""
        return self.text_bytes / 1e6 / max((now or time.monotonic()) - self.main_at, 1e-9)

    def steady_rates(self) -> tuple[float, float] | None:
        """(text MB/s, tokens/s) after the megatron import finished: the sustained pipeline speed.

        None when the input was (nearly) all encoded before that point: no steady state to measure.
        """
        if (
            self.ready_at is None
            or self.ended is None
            or self.ready_bytes is None
            or self.ready_tokens is None
        ):
            return None
        interval, nbytes = self.ended - self.ready_at, self.text_bytes - self.ready_bytes
        if interval < 1.0 or nbytes < 0.1 * self.text_bytes:
            return None
        return nbytes / 1e6 / interval, (self.tokens - self.ready_tokens) / interval


class Progress:
    """One stderr line every ``interval`` seconds: documents, tokens, MB and MB/s so far."""

    def __init__(self, stats: Stats, interval: float) -> None:
        self._stats = stats
        self._interval = interval
        self._next = time.monotonic() + interval

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._interval
            s = self._stats
            print(
                f"preprocess: {s.documents:,} docs, {s.tokens:,} tokens, {s.text_bytes / 1e6:,.1f} MB, "
                f"{s.rate(now):.2f} MB/s",
                file=sys.stderr,
                flush=True,
            )


def tokenize_into(
    writer: DatasetWriter,
    docs: Iterable[bytes],
    tok: Tokenizer,
    workers: int,
    chunk_bytes: int,
    stats: Stats,
    progress: Progress,
    split_sentences: bool = False,
) -> None:
    """Encode ``docs`` on ``workers`` threads and append them to ``writer`` in input order (as sentence
    lists with ``split_sentences``)."""

    def encode(chunk: list[bytes]) -> list[Any]:
        if split_sentences:
            return encode_sentence_documents(tok, chunk)
        return tok.encode_documents(chunk)

    builder = writer.builder
    with ThreadPoolExecutor(workers, thread_name_prefix="encode") as pool:
        try:
            for chunk, arrays in ordered_map(encode, chunked(docs, chunk_bytes), pool, 4 * workers):
                stats.add(len(arrays), sum(map(document_size, arrays)), sum(map(len, chunk)))
                if builder.ready_at is not None:
                    stats.mark_ready(builder.ready_at)
                writer.add(arrays)
                progress.tick()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def summary(
    stats: Stats, skips: SkipCounter, writer: DatasetWriter, args: argparse.Namespace
) -> dict[str, Any]:
    """Machine-readable figures of a run (``--summary-json``); times in seconds since process start."""

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - stats.started, 3)

    elapsed = (stats.ended or time.monotonic()) - stats.started
    steady = stats.steady_rates()
    return {
        "documents": stats.documents,
        "tokens": stats.tokens,
        "text_bytes": stats.text_bytes,
        "skipped": skips.total,
        "skipped_by_reason": dict(skips.counts),
        "read_errors": skips.read_error_records(),
        "elapsed_s": round(elapsed, 3),
        "mb_per_s": round(stats.rate(stats.ended), 3),
        "tokens_per_s": round(stats.tokens / max((stats.ended or time.monotonic()) - stats.main_at, 1e-9), 1),
        "steady_mb_per_s": None if steady is None else round(steady[0], 3),
        "steady_tokens_per_s": None if steady is None else round(steady[1], 1),
        "startup_s": since(stats.main_at),
        "first_doc_s": since(stats.first_doc_at),
        "builder_ready_s": since(stats.ready_at),
        "cpu_s": round(cpu_seconds(), 3),
        "builder_cpu_s": writer.builder.total_cpu_s,
        "builder_import_cpu_s": writer.builder.import_cpu_s,
        "workers": args.workers,
        "dtype": writer.dtype.__name__,
        "outputs": [s.prefix for s in writer.shards],
    }


def print_summary(s: dict[str, Any], skips: SkipCounter) -> None:
    steady = (
        "n/a (input done before the megatron import was)"
        if s["steady_mb_per_s"] is None
        else f"{s['steady_mb_per_s']:.2f}"
    )
    print(
        f"preprocess: wrote {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}) "
        f"to {len(s['outputs'])} file pair(s)\n"
        f"preprocess: skipped {skips.describe()}\n"
        f"preprocess: elapsed {s['elapsed_s']:.2f}s, {s['text_bytes'] / 1e6:.2f} MB, {s['mb_per_s']:.2f} MB/s, "
        f"{s['tokens_per_s']:,.0f} tokens/s, steady MB/s {steady}; first document encoded at "
        f"{s['first_doc_s']}s, megatron builder ready at {s['builder_ready_s']}s",
        flush=True,
    )
    for error in skips.read_errors:
        print(f"preprocess: warning: {error.describe()}", file=sys.stderr, flush=True)


def dataset_meta(
    tok: Tokenizer,
    writer: DatasetWriter,
    stats: Stats,
    skips: SkipCounter,
    paths: Sequence[Path],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """``PREFIX.meta.json`` minus the shard list: what bigtrain.data checks before training."""
    return {
        "format": "bigtrain-indexed-dataset/1",
        "preprocess_id": uuid.uuid4().hex,  # this run: keys the caches derived from its files
        "tokenizer_fingerprint": tok.fingerprint,
        "tokenizer": str(tok.dir),
        "vocab_size": tok.vocab_size,
        "eod_id": None if args.split_sentences else tok.eod_id,  # sentences end with no EOD
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "split_sentences": bool(args.split_sentences),
        "dtype": writer.dtype.__name__,
        "documents": stats.documents,
        "tokens": stats.tokens,
        "text_bytes": stats.text_bytes,
        "skipped_by_reason": dict(skips.counts),
        "read_errors": skips.read_error_records(),
        "inputs": [str(p) for p in paths],
        "json_key": args.json_key,
        "shard_size_tokens": args.shard_size_tokens,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the writer, which deletes its temporary files


def run(args: argparse.Namespace, started: float) -> int:
    check_output_dir(Path(args.output_prefix).parent, "--output-prefix")
    tok = Tokenizer.load(args.tokenizer)
    missing = tok.missing_bert_specials() if args.split_sentences else []
    if missing:
        raise TokenizerError(bert_specials_hint(tok, missing))
    paths = expand_inputs(args.input)
    stats = Stats(started)
    skips = SkipCounter(strict=args.strict)
    writer = DatasetWriter(
        args.output_prefix, choose_dtype(tok.vocab_size), BuilderProcess(), args.shard_size_tokens
    )
    with writer:
        if isinstance(tok, HFTokenizer):  # transformers loads while the builder process starts
            ending = (
                "sentences, no EOD" if args.split_sentences else f"documents end with EOD id {tok.eod_id}"
            )
            print(f"preprocess: {tok!r}; {ending}", file=sys.stderr, flush=True)
            verify_parity(tok, PROBE_TEXTS)
        Path(args.output_prefix).parent.mkdir(parents=True, exist_ok=True)
        docs = iter_documents(paths, args.json_key, skips, skips.read_error)
        tokenize_into(
            writer,
            docs,
            tok,
            args.workers,
            args.chunk_bytes,
            stats,
            Progress(stats, args.log_interval),
            args.split_sentences,
        )
        writer.close()
        stats.ended = time.monotonic()
        stats.mark_ready(writer.builder.ready_at or stats.ended)
        if stats.documents == 0:
            unreadable = "".join(f"; {e.describe()}" for e in skips.read_errors)
            print(
                f"preprocess: error: no valid documents in the input (skipped {skips.describe()}){unreadable}",
                file=sys.stderr,
            )
            return 1
        result = summary(stats, skips, writer, args)
        meta = dataset_meta(tok, writer, stats, skips, paths, args)
        writer.commit(meta)
    print_summary(result, skips)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    started = process_start_time()
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args, started)
    except (InputError, FileNotFoundError, TokenizerError, ParityError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, BadLineError) else 2


if __name__ == "__main__":
    sys.exit(main())
