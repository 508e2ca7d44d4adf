"""Fine-tuning input that is compressed, not UTF-8, unreadable part way or a directory (issue 12 §5): read
through tokenizer.io's opener, every bad line named file:line, the valid records before a failure kept."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bigtrain.finetune import data as d
from tests.finetune.helpers import write_jsonl

ROWS = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(16)]
BAD_UTF8 = b'{"prompt": "a", "response": "caf\xe9"}\n'  # Latin-1, not UTF-8


class FakeChat:
    """Encodes a conversation as one token per character of its reply (read order is what is checked)."""

    def encode(self, messages: list[dict[str, str]]) -> d.Example:
        reply = messages[-1]["content"]
        return d.Example([ord(c) for c in reply], [True] * len(reply))


def replies(examples: list[d.Example]) -> list[str]:
    return ["".join(map(chr, e.tokens)) for e in examples]


def read(path: Path, strict: bool = False) -> tuple[list[str], d.ReadStats]:
    examples, stats = d.read_sft(str(path), "finetune.train", FakeChat(), 64, "truncate", strict)
    return replies(examples), stats


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_compressed_jsonl_is_decompressed(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(ROWS)))
    got, stats = read(path)
    assert got == [r["response"] for r in ROWS] and stats.lines == 16 and not stats.skipped


def test_invalid_utf8_line_is_a_bad_line_and_the_valid_ones_stay(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(ROWS) + BAD_UTF8)
    got, stats = read(path)
    assert got == [r["response"] for r in ROWS] and stats.lines == 17
    assert stats.skipped == {"invalid UTF-8": 1} and "1 invalid UTF-8" in stats.summary("finetune.train")
    with pytest.raises(d.DataError, match=rf"^{path}:17: not valid UTF-8 \(byte 0xe9 at column 33\)$"):
        read(path, strict=True)


def test_classification_reads_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "cls.jsonl"
    path.write_bytes(
        b'{"text": "a b", "label": "x"}\n' + b'{"text": "\xff", "label": "y"}\n{"text": "c", "label": "y"}\n'
    )
    tok = lambda text: {"input_ids": [1] * len(text.split())}  # noqa: E731
    examples, stats, labels = d.read_classify(str(path), "finetune.train", tok, 8, "truncate", False, None)
    assert [e.target for e in examples] == [0, 1] and labels == ["x", "y"]
    assert stats.skipped == {"invalid UTF-8": 1}
    with pytest.raises(d.DataError, match=rf"^{path}:2: not valid UTF-8"):
        d.read_classify(str(path), "finetune.train", tok, 8, "truncate", True, None)


def test_read_error_keeps_the_records_before_it_and_names_file_and_line(tmp_path: Path) -> None:
    data = gzip.compress(jsonl(ROWS * 200))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    complete = __import__("zlib").decompressobj(wbits=31).decompress(data[: len(data) // 2]).count(b"\n")
    after = write_jsonl(tmp_path / "after.jsonl", ROWS[:3])
    examples, stats = d.read_sft([str(cut), str(after)], "finetune.train", FakeChat(), 64, "truncate", False)
    assert 0 < complete < 3200
    assert replies(examples) == [r["response"] for r in (ROWS * 200)[:complete] + ROWS[:3]]
    (error,) = stats.read_errors
    assert (error.path, error.line, error.kept) == (cut, complete + 1, complete)
    assert f"; {cut}:{complete + 1}: unreadable (" in stats.summary("finetune.train")
    assert f"kept the {complete} record(s) before it" in stats.summary("finetune.train")
    with pytest.raises(d.DataError, match=rf"^{cut}:{complete + 1}: unreadable \("):
        d.read_sft([str(cut), str(after)], "finetune.train", FakeChat(), 64, "truncate", True)


def test_not_gzip_behind_a_gz_name_is_a_read_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(jsonl(ROWS))
    got, stats = read(path)
    assert got == [] and [(e.path, e.line, e.kept) for e in stats.read_errors] == [(path, 1, 0)]
    assert "Not a gzipped file" in stats.read_errors[0].detail


def test_directory_is_a_one_line_error_and_a_glob_skips_directories(tmp_path: Path) -> None:
    (tmp_path / "sub.jsonl").mkdir()
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    with pytest.raises(
        d.DataError, match=rf"^finetune.train: {tmp_path} is a directory, not a file \(give its"
    ):
        d.expand_paths(str(tmp_path), "finetune.train")
    assert d.expand_paths(str(tmp_path / "*.jsonl"), "finetune.train") == [tmp_path / "a.jsonl"]
