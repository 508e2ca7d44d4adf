"""Inputs that fail while being read (issue 12 §5): named with file and line, the documents before the
failure kept and counted, the other files read on; ``--strict`` stops. In the reader and in both CLIs."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys
import zlib
from pathlib import Path

import pytest

from tests.conftest import run_cmd
from tests.tokenizer.corpus import make_corpus
from tests.tokenizer.test_preprocess import preprocess_cmd, read_dataset
from tokenizer import Tokenizer
from tokenizer.io import BadLineError, InputError, ReadError, SkipCounter, expand_inputs, iter_documents

DOCS = make_corpus(900, seed=21)  # ~290 kB: bzip2 at level 1 (100 kB blocks) has whole blocks before the cut
COMPRESSORS = {"gz": gzip.compress, "bz2": lambda data: bz2.compress(data, 1), "xz": lzma.compress}
DECOMPRESSORS = {  # each format's own incremental decoder: every byte recoverable from a truncated file
    "gz": lambda: zlib.decompressobj(wbits=31),
    "bz2": bz2.BZ2Decompressor,
    "xz": lzma.LZMADecompressor,
}


def jsonl_bytes(docs: list[str]) -> bytes:
    return b"".join(json.dumps({"text": d}, ensure_ascii=False).encode() + b"\n" for d in docs)


def truncated(path: Path, kind: str, docs: list[str] = DOCS) -> int:
    """Write ``docs`` compressed as ``kind``, cut to half its size; returns the complete lines left in it."""
    data = COMPRESSORS[kind](jsonl_bytes(docs))
    path.write_bytes(data[: len(data) // 2])
    recoverable = DECOMPRESSORS[kind]().decompress(data[: len(data) // 2])
    return recoverable.count(b"\n")


def read_all(paths: list[Path], strict: bool = False) -> tuple[list[str], SkipCounter]:
    skips = SkipCounter(strict=strict)
    docs = [d.decode("utf-8") for d in iter_documents(paths, "text", skips, skips.read_error)]
    return docs, skips


@pytest.mark.parametrize("kind", ["gz", "bz2", "xz"])
def test_truncated_compressed_file_keeps_the_documents_before_the_cut(tmp_path: Path, kind: str) -> None:
    cut = tmp_path / f"cut.jsonl.{kind}"
    complete = truncated(cut, kind)
    assert 0 < complete < len(DOCS)
    after = tmp_path / "after.jsonl"
    after.write_bytes(jsonl_bytes(DOCS[:7]))
    docs, skips = read_all([cut, after])
    assert docs == DOCS[:complete] + DOCS[:7]  # nothing valid lost, nothing invented, next file read
    (error,) = skips.read_errors
    assert (error.path, error.line, error.kept) == (cut, complete + 1, complete)
    assert "truncated" in error.describe() and error.describe().startswith(
        f"{cut}:{complete + 1}: unreadable"
    )
    assert skips.total == 0 and "1 unreadable file(s)" in skips.describe()
    with pytest.raises(BadLineError, match=f"^{cut}:{complete + 1}: unreadable"):
        read_all([cut, after], strict=True)


def _not_compressed(tmp_path: Path) -> tuple[Path, int, int]:
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(jsonl_bytes(DOCS[:5]))
    return path, 1, 0


def _corrupt_middle(tmp_path: Path) -> tuple[Path, int, int]:
    """Bytes flipped in the middle of a gzip member. Deflate may decode garbage for a while (skipped as
    bad lines, or even parsed as documents) until zlib or, at the latest, the member's CRC fails: only
    the lines before the damage are known good; returns how many (as a negative ``kept``)."""
    data = bytearray(gzip.compress(jsonl_bytes(DOCS)))
    start = len(data) // 2
    intact = zlib.decompressobj(wbits=31).decompress(bytes(data[:start])).count(b"\n")
    for i in range(start, start + 64):
        data[i] ^= 0x5A
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    return path, -1, -intact


def _vanished(tmp_path: Path) -> tuple[Path, int | None, int]:
    """Listed, then deleted before reading (another job cleaning up): an OSError while opening."""
    path = tmp_path / "gone.jsonl"
    path.write_bytes(jsonl_bytes(DOCS[:3]))
    (listed,) = expand_inputs([str(path)])
    path.unlink()
    return listed, 1, 0


def _directory_as_txt(tmp_path: Path) -> tuple[Path, int | None, int]:
    path = tmp_path / "notes.txt"
    path.mkdir()
    return path, None, 0


@pytest.mark.parametrize("case", [_not_compressed, _corrupt_middle, _vanished, _directory_as_txt])
def test_other_read_failures_name_the_file(tmp_path: Path, case) -> None:
    path, line, kept = case(tmp_path)
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl_bytes(DOCS[:4]))
    docs, skips = read_all([path, good])
    (error,) = skips.read_errors
    if kept < 0:  # corrupt middle: the intact lines all kept, the failure found further on
        intact = -kept
        kept, line = error.kept, error.line
        assert 0 < intact <= kept < line <= len(DOCS) and docs[:intact] == DOCS[:intact]
    assert (error.path, error.line, error.kept) == (path, line, kept)
    assert docs[kept:] == DOCS[:4] and docs[: min(kept, 50)] == DOCS[: min(kept, 50)]
    message = error.describe()
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: ") and "\n" not in message
    with pytest.raises(InputError, match=f"^{path}"):  # no handler: an error, never a silent skip
        list(iter_documents([path], "text", SkipCounter()))


def test_directory_given_as_input_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"input is a directory, not a file: {tmp_path} "):
        expand_inputs([str(tmp_path)])


def test_read_error_record() -> None:
    error = ReadError(Path("a.jsonl.gz"), 3, "why", 2)
    counter = SkipCounter()
    counter.read_error(error)
    assert counter.read_error_records() == [
        {"file": "a.jsonl.gz", "line": 3, "error": "why", "documents_kept": 2}
    ]


# ------------------------------------------------------------------------------------------ the CLIs
def test_preprocess_keeps_what_was_readable_and_names_the_file(tok_dir: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.jsonl.gz"
    complete = truncated(cut, "gz")
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl_bytes(DOCS[-9:]))
    summary = tmp_path / "summary.json"
    proc = run_cmd(
        preprocess_cmd(
            [str(cut), str(good)], tok_dir, tmp_path / "out" / "d", "--summary-json", str(summary)
        ),
        timeout=180,
    )
    assert f"{cut}:{complete + 1}: unreadable" in proc.stderr and "Traceback" not in proc.stderr
    tok = Tokenizer.load(tok_dir)
    expected = DOCS[:complete] + DOCS[-9:]
    written = read_dataset(tmp_path / "out" / "d")
    assert [d.tolist() for d in written] == [tok.encode(t) + [tok.eod_id] for t in expected]
    report = json.loads(summary.read_text())
    assert report["documents"] == len(expected) and report["read_errors"] == [
        {"file": str(cut), "line": complete + 1, "error": report["read_errors"][0]["error"],
         "documents_kept": complete}
    ]  # fmt: skip
    meta = json.loads((tmp_path / "out" / "d.meta.json").read_text())
    assert meta["read_errors"] == report["read_errors"] and meta["documents"] == len(expected)

    strict = run_cmd(
        preprocess_cmd([str(cut), str(good)], tok_dir, tmp_path / "strict" / "d", "--strict"),
        timeout=180,
        check=False,
    )
    assert strict.returncode == 1
    assert strict.stderr.strip().splitlines() == [
        f"preprocess: error: {cut}:{complete + 1}: unreadable (" + report["read_errors"][0]["error"] + ")"
    ]
    assert not (tmp_path / "strict").exists() or not list((tmp_path / "strict").iterdir())


def test_train_names_the_unreadable_file(tmp_path: Path) -> None:
    cut = tmp_path / "cut.jsonl.xz"
    complete = truncated(cut, "xz")
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(jsonl_bytes(DOCS[:50]))

    def train(*inputs: Path, extra: tuple[str, ...] = ()):
        cmd = [sys.executable, "-m", "tokenizer.train", "--input", *map(str, inputs), "--vocab-size", "1000",
               "--output", str(tmp_path / "tok"), *extra]  # fmt: skip
        return run_cmd(cmd, timeout=180, check=False)

    only_bad = train(plain)  # was "sentencepiece failed: INTERNAL: BadGzipFile", naming nothing
    assert only_bad.returncode == 1 and "INTERNAL" not in only_bad.stderr
    assert f"{plain}:1: unreadable (BadGzipFile: Not a gzipped file" in only_bad.stderr
    assert len(only_bad.stderr.strip().splitlines()) == 1

    strict = train(cut, plain, extra=("--strict",))
    assert strict.returncode == 1 and "INTERNAL" not in strict.stderr
    assert strict.stderr.strip().startswith(f"tokenizer.train: error: {cut}:{complete + 1}: unreadable")
    assert not (tmp_path / "tok").exists()

    ok = train(cut, plain)
    assert ok.returncode == 0, ok.stderr
    assert f"{cut}:{complete + 1}: unreadable" in ok.stderr and f"{plain}:1: unreadable" in ok.stderr
    meta = json.loads((tmp_path / "tok" / "bigtrain_tokenizer.json").read_text())["training"]
    assert meta["documents"] == complete
    assert [(e["file"], e["line"], e["documents_kept"]) for e in meta["read_errors"]] == [
        (str(cut), complete + 1, complete),
        (str(plain), 1, 0),
    ]


# ------------------------------------------------------------------------------------------ named skips, outputs
def test_invalid_utf8_txt_is_skipped_whole_and_named_at_its_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl_bytes(DOCS[:3]))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two\nline three\nline four\nbad \xff\xfe bytes\nline six\n")
    docs, skips = read_all([good, bad])
    assert docs == DOCS[:3]  # the .txt is one document: skipped whole, the JSONL kept
    assert skips.counts["invalid_utf8"] == 1 and skips.first == {"invalid_utf8": f"{bad}:5"}
    assert skips.describe() == f"1 (invalid_utf8=1, first at {bad}:5)"
    with pytest.raises(BadLineError, match=f"^{bad}:5: invalid_utf8$"):
        read_all([good, bad], strict=True)


def test_skip_summary_names_the_first_bad_line_of_each_reason(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl_bytes(DOCS[:2]) + b"{bad\n\n{bad\n" + jsonl_bytes(DOCS[2:3]))
    docs, skips = read_all([path])
    assert docs == DOCS[:3]
    assert skips.describe() == f"3 (blank_line=1, first at {path}:4; malformed_json=2, first at {path}:3)"


@pytest.mark.parametrize("tool", ["train", "preprocess"])
def test_output_path_through_a_regular_file_is_a_usage_error(tmp_path: Path, tool: str) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl_bytes(DOCS[:3]))
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory\n")
    if tool == "train":
        cmd = ["--input", str(good), "--vocab-size", "300", "--output", str(blocker)]
        expected = f"tokenizer.train: error: --output {blocker}: it is an existing file, not a directory"
    else:
        cmd = ["--input", str(good), "--tokenizer", str(tmp_path), "--output-prefix", str(blocker / "x")]
        expected = f"preprocess: error: --output-prefix {blocker}: it is an existing file, not a directory"
    proc = run_cmd([sys.executable, "-m", f"tokenizer.{tool}", *cmd], timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(expected)
    assert blocker.read_text() == "not a directory\n"
