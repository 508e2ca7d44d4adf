"""Streaming document readers shared by tokenizer training and dataset preprocessing.

Inputs are ``.jsonl`` (one JSON object per line, text under a key), ``.jsonl.gz``/``.jsonl.bz2``/
``.jsonl.xz`` (the same, compressed) and ``.txt`` (the whole file is one document). Files are read line by line, so
memory is bounded by the largest single document, never by the file size; a ``.txt`` document is
necessarily read whole because it is tokenized as one piece.

Documents come out as UTF-8 ``bytes``: SentencePiece accepts them without another conversion,
``len()`` is the byte count used for throughput, and producing them proves the text is valid
Unicode (a JSON escape such as ``"\\ud800"`` decodes to a lone surrogate that cannot be encoded).

Bad input is reported through a callback with ``(path, line, reason)``; the reasons are the
fixed names in :data:`SKIP_REASONS` so counts can be compared between runs and tools. A file that
cannot be read on (truncated or corrupt compressed data, not compressed at all, an I/O error) is
reported through a second callback with its :class:`ReadError`: the documents read before the
failure stay, the rest of that file is skipped, the other files follow.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SKIP_REASONS = (
    "blank_line",  # a JSONL line with nothing (or only whitespace) on it
    "malformed_json",  # not parseable as JSON
    "not_an_object",  # valid JSON, but not an object ({...})
    "missing_key",  # object without the --json-key field
    "not_a_string",  # the field is a number, list, null, ...
    "empty_document",  # the text is empty or whitespace only
    "invalid_utf8",  # bytes are not UTF-8, or the text holds lone surrogates
)

SUFFIXES = (".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl", ".txt")
# compressed kinds by file-name suffix; any other name is opened as plain bytes
_OPENERS: dict[str, Callable[[Path], io.BufferedIOBase]] = {
    "jsonl.gz": lambda path: gzip.open(path, "rb"),
    "jsonl.bz2": lambda path: bz2.open(path, "rb"),
    "jsonl.xz": lambda path: lzma.open(path, "rb"),
}
# What reading a damaged or unreadable input raises: OSError covers gzip.BadGzipFile, bz2's "Invalid
# data stream", IsADirectoryError and PermissionError; EOFError is a compressed stream cut short.
READ_FAILURES = (OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class ReadError:
    """An input that failed part way: where (``line`` None when unknown), why, and what was kept."""

    path: Path
    line: int | None
    detail: str
    kept: int  # valid documents read from the file before the failure

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else str(self.path)

    def describe(self, unit: str = "document") -> str:
        """One line: ``file:line: unreadable (why); kept the N documents before it, skipped the rest``."""
        return (
            f"{self.where}: unreadable ({self.detail}); kept the {self.kept} {unit}(s) before it, "
            "skipped the rest of the file"
        )


SkipHandler = Callable[[Path, int, str], None]
ReadErrorHandler = Callable[[ReadError], None]


class InputError(Exception):
    """A problem with the inputs as a whole (missing file, empty glob); the message is one line."""


class BadLineError(InputError):
    """A bad document in strict mode; the message is ``file:line: reason``."""


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files in the order given; a glob expands to its matches sorted by name.

    Fails on a missing file, on a glob matching nothing and on an unsupported suffix, before any
    work starts, so a typo cannot silently produce a smaller dataset.
    """
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise InputError(f"input glob matched no files: {pattern}")
            paths.extend(Path(m) for m in matches)
        else:
            path = Path(pattern)
            if path.is_dir():
                raise InputError(
                    f"input is a directory, not a file: {pattern} (give its files, e.g. '{pattern}/*.jsonl')"
                )
            if not path.is_file():
                raise InputError(f"input file not found: {pattern}")
            paths.append(path)
    for path in paths:
        input_kind(path)
    return paths


def check_output_dir(directory: Path, option: str) -> None:
    """InputError naming ``option`` and the path when ``directory`` cannot be (or be created as) a directory:
    it, or a folder above it, is an existing file. Checked before any work starts."""
    for p in (directory, *directory.parents):
        if p.exists():
            if not p.is_dir():
                blocker = "it" if p == directory else str(p)
                raise InputError(
                    f"{option} {directory}: {blocker} is an existing file, not a directory (choose another path)"
                )
            return


def input_kind(path: Path) -> str:
    """``"jsonl.gz"``, ``"jsonl"`` or ``"txt"`` from the file name; InputError otherwise."""
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    raise InputError(f"unsupported input type (want {', '.join(SUFFIXES)}): {path}")


def iter_documents(
    paths: Sequence[Path], json_key: str, on_skip: SkipHandler, on_read_error: ReadErrorHandler | None = None
) -> Iterator[bytes]:
    """Every valid document of ``paths`` in order, as UTF-8 bytes; bad ones go to ``on_skip``.

    A file that fails while being read goes to ``on_read_error`` after its documents read so far, and
    reading goes on with the next file; without a handler it raises :class:`InputError` naming the file
    and line (line: the one being read when it failed).
    """
    for path in paths:
        kind = input_kind(path)
        lineno, kept = 0, 0
        try:
            if kind == "txt":
                doc = _txt_document(path, on_skip)
                if doc is not None:
                    kept += 1
                    yield doc
                continue
            with open_jsonl(path) as f:
                for lineno, raw in enumerate(f, start=1):
                    doc, reason = parse_jsonl_line(raw, json_key)
                    if reason is None:
                        kept += 1
                        yield doc
                    else:
                        on_skip(path, lineno, reason)
        except READ_FAILURES as e:
            error = ReadError(path, None if kind == "txt" else lineno + 1, read_failure(e), kept)
            if on_read_error is None:
                raise InputError(error.describe()) from None
            on_read_error(error)


def open_jsonl(path: Path) -> io.BufferedIOBase:
    """A JSONL file opened for reading binary lines: ``.jsonl.gz``/``.jsonl.bz2``/``.jsonl.xz`` decompressed
    (by name), any other name read as is. Reading it may raise one of :data:`READ_FAILURES`."""
    name = path.name.lower()
    for kind, opener in _OPENERS.items():
        if name.endswith("." + kind):
            return opener(path)
    return open(path, "rb")


def read_failure(e: BaseException) -> str:
    """Why a read failed, in a few words (the path is named by the caller, not repeated)."""
    if isinstance(e, EOFError):
        return f"compressed data ends early, the file is truncated: {e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def parse_jsonl_line(raw: bytes, json_key: str) -> tuple[bytes, str | None]:
    """``(document, None)`` for a good line, ``(b"", reason)`` for a bad one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return b"", "invalid_utf8"
    if not line or line.isspace():
        return b"", "blank_line"
    try:
        obj = json.loads(line)
    except ValueError:
        return b"", "malformed_json"
    if not isinstance(obj, dict):
        return b"", "not_an_object"
    if json_key not in obj:
        return b"", "missing_key"
    text = obj[json_key]
    if not isinstance(text, str):
        return b"", "not_a_string"
    return _document_bytes(text)


def _txt_document(path: Path, on_skip: SkipHandler) -> bytes | None:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # the file is one document: skipped whole, named at the bad bytes' line
        on_skip(path, raw.count(b"\n", 0, e.start) + 1, "invalid_utf8")
        return None
    if not text or text.isspace():
        on_skip(path, 1, "empty_document")
        return None
    return raw  # strict UTF-8 decoding succeeded, so the bytes are the document as is


def _document_bytes(text: str) -> tuple[bytes, str | None]:
    if not text or text.isspace():
        return b"", "empty_document"
    try:
        return text.encode("utf-8"), None
    except UnicodeEncodeError:
        return b"", "invalid_utf8"


class SkipCounter:
    """The ``on_skip`` and ``on_read_error`` handlers of the CLIs: counts bad documents by reason and
    keeps read errors, or raises in strict mode.

    In strict mode the first bad line or unreadable file raises BadLineError with ``file:line: reason``,
    the format editors and CI logs turn into a link.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        self.first: dict[str, str] = {}  # reason -> ``file:line`` of its first bad document
        self.read_errors: list[ReadError] = []

    def __call__(self, path: Path, line: int, reason: str) -> None:
        if self.strict:
            raise BadLineError(f"{path}:{line}: {reason}")
        self.counts[reason] += 1
        self.first.setdefault(reason, f"{path}:{line}")

    def read_error(self, error: ReadError) -> None:
        """The ``on_read_error`` handler: kept for the summary, or in strict mode raised as BadLineError."""
        if self.strict:
            raise BadLineError(f"{error.where}: unreadable ({error.detail})")
        self.read_errors.append(error)

    def read_error_records(self) -> list[dict[str, object]]:
        """The read errors as JSON-ready records (summary and dataset metadata)."""
        return [
            {"file": str(e.path), "line": e.line, "error": e.detail, "documents_kept": e.kept}
            for e in self.read_errors
        ]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """``"3 (malformed_json=2, first at a.jsonl:4; blank_line=1, first at b.txt:1), 1 unreadable file(s)"``:
        the non-zero counts only, each with where its first bad document is."""
        parts = [f"{reason}={n}, first at {self.first[reason]}" for reason, n in self.counts.items() if n]
        unreadable = f", {len(self.read_errors)} unreadable file(s)" if self.read_errors else ""
        return f"{self.total}" + (f" ({'; '.join(parts)})" if parts else "") + unreadable
