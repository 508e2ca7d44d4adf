"""tokenizer.preprocess end to end: order, EOD, exact detokenization, skip counts, shards, workers, errors."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cpu_env, run_cmd
from tests.tokenizer.corpus import make_corpus, write_jsonl
from tokenizer import Tokenizer
from tokenizer.io import parse_jsonl_line
from tokenizer.writer import choose_dtype

# every kind of bad line, with the reason it must be counted under
BAD_LINES = [
    (b"\n", "blank_line"),
    (b"   \t \n", "blank_line"),
    (b'{"text": "unterminated\n', "malformed_json"),
    (b"not json at all\n", "malformed_json"),
    (b'["a", "list"]\n', "not_an_object"),
    (b'"a bare string"\n', "not_an_object"),
    (b'{"content": "wrong key"}\n', "missing_key"),
    (b'{"text": 42}\n', "not_a_string"),
    (b'{"text": null}\n', "not_a_string"),
    (b'{"text": ["a"]}\n', "not_a_string"),
    (b'{"text": ""}\n', "empty_document"),
    (b'{"text": "  \\n\\t  "}\n', "empty_document"),
    (b'{"text": "bad \xff\xfe bytes"}\n', "invalid_utf8"),
    (b'{"text": "lone \\ud800 surrogate"}\n', "invalid_utf8"),
]


def preprocess_cmd(inputs: list[str], tok_dir: Path, prefix: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tokenizer.preprocess", "--input", *inputs, "--tokenizer", str(tok_dir),
            "--output-prefix", str(prefix), *extra]  # fmt: skip


def read_dataset(prefix: Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    assert list(ds.document_indices) == list(range(len(ds) + 1))  # one sequence per document
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: ds unmaps its file when collected


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A JSONL file with bad lines of every kind, a .jsonl.gz, and .txt files reached by a glob."""
    root = tmp_path_factory.mktemp("inputs")
    docs = make_corpus(160, seed=99)
    mixed = root / "mixed.jsonl"
    with open(mixed, "wb") as f:
        for i, doc in enumerate(docs[:60]):
            f.write(json.dumps({"text": doc, "id": i}, ensure_ascii=False).encode() + b"\n")
            if i % 4 == 1 and i // 4 < len(BAD_LINES):
                f.write(BAD_LINES[i // 4][0])
    gz = root / "part.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs[60:150])
    txt_dir = root / "txt"
    txt_dir.mkdir()
    for i, doc in enumerate(docs[150:]):  # names sort as b_00..b_09; the glob must keep that order
        (txt_dir / f"b_{9 - i:02d}.txt").write_text(doc, encoding="utf-8")
    (txt_dir / "a_empty.txt").write_text("  \n ", encoding="utf-8")
    expected_skips = {reason: 0 for _, reason in BAD_LINES}
    for _, reason in BAD_LINES:
        expected_skips[reason] += 1
    expected_skips["empty_document"] += 1  # a_empty.txt
    txt_docs = [(txt_dir / f"b_{j:02d}.txt").read_text(encoding="utf-8") for j in range(10)]
    return {
        "mixed": str(mixed),
        "gz": str(gz),
        "glob": str(txt_dir / "*.txt"),
        "docs": docs[:150] + txt_docs,
        "skips": expected_skips,
    }


@pytest.fixture(scope="module")
def runs(inputs: dict, tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two real CLI runs at once (each waits seconds for megatron): 2 workers unsharded, 1 worker sharded."""
    out = tmp_path_factory.mktemp("out")
    files = [inputs["mixed"], inputs["gz"], inputs["glob"]]
    full = preprocess_cmd(
        files, tok_dir, out / "full", "--workers", "2", "--summary-json", str(out / "full.json")
    )
    sharded = preprocess_cmd(files, tok_dir, out / "sh", "--workers", "1", "--shard-size-tokens", "2000",
                             "--chunk-bytes", "3000", "--summary-json", str(out / "sh.json"))  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda cmd: run_cmd(cmd, timeout=300), [full, sharded]))
    return {"out": out, "full": procs[0], "sharded": procs[1]}


def test_documents_in_order_with_eod_and_exact_text(runs: dict, inputs: dict, tok_dir: Path) -> None:
    tok = Tokenizer.load(tok_dir)
    docs = read_dataset(runs["out"] / "full")
    assert len(docs) == len(inputs["docs"]) == 160
    for got, want in zip(docs, inputs["docs"]):
        assert got.dtype == np.uint16 and got[-1] == tok.eod_id
        assert tok.eod_id not in got[:-1]
        assert tok.decode(got[:-1]) == want
    meta = json.loads((runs["out"] / "full.meta.json").read_text())
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and meta["vocab_size"] == tok.vocab_size
    assert meta["dtype"] == "uint16" and meta["eod_id"] == 2 and meta["documents"] == 160
    assert meta["tokens"] == sum(len(d) for d in docs)
    assert [Path(p).name for p in meta["inputs"]][-10:] == [f"b_{j:02d}.txt" for j in range(10)]


def test_skipped_lines_are_counted_exactly(runs: dict, inputs: dict) -> None:
    summary = json.loads((runs["out"] / "full.json").read_text())
    nonzero = {reason: n for reason, n in summary["skipped_by_reason"].items() if n}
    assert nonzero == inputs["skips"]
    assert summary["documents"] == 160 and summary["skipped"] == sum(inputs["skips"].values())
    for figure in ("documents", "tokens", "skipped", "MB/s"):
        assert figure in runs["full"].stdout
    assert summary["first_doc_s"] is not None and summary["first_doc_s"] <= summary["elapsed_s"]


def test_shards_concatenate_to_unsharded_output_and_workers_agree(runs: dict) -> None:
    out = runs["out"]
    shards = sorted(out.glob("sh_*.bin"))
    assert len(shards) > 3
    assert not (out / "sh.bin").exists()
    full = read_dataset(out / "full")  # 2 workers
    pieces = [read_dataset(p.with_suffix("")) for p in shards]  # 1 worker
    assert all(pieces)
    assert [d.tolist() for piece in pieces for d in piece] == [d.tolist() for d in full]
    for piece in pieces[:-1]:  # a shard closes once it holds >= 2000 tokens, never splitting a document
        assert sum(map(len, piece)) >= 2000 and sum(map(len, piece[:-1])) < 2000
    meta = json.loads((out / "sh.meta.json").read_text())
    assert [Path(s["prefix"]).name for s in meta["shards"]] == [p.stem for p in shards]
    assert sum(s["documents"] for s in meta["shards"]) == 160
    assert not list(out.glob("*.tmp-*"))


def test_strict_stops_at_first_bad_line(inputs: dict, tok_dir: Path, tmp_path: Path) -> None:
    proc = run_cmd(
        preprocess_cmd([inputs["mixed"]], tok_dir, tmp_path / "s", "--strict"), timeout=120, check=False
    )
    assert proc.returncode == 1
    assert f"{inputs['mixed']}:3: blank_line" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "input file not found"),
        ("glob", "input glob matched no files"),
        ("tokenizer", "no tokenizer.model"),
        ("suffix", "unsupported input type"),
    ],
)
def test_bad_arguments_give_one_line_errors(
    case: str, message: str, inputs: dict, tok_dir: Path, tmp_path: Path
) -> None:
    files, tok = [inputs["mixed"]], tok_dir
    if case == "missing":
        files = [str(tmp_path / "absent.jsonl")]
    elif case == "glob":
        files = [str(tmp_path / "*.jsonl")]
    elif case == "tokenizer":
        tok = tmp_path
    else:
        (tmp_path / "data.csv").write_text("a,b\n")
        files = [str(tmp_path / "data.csv")]
    proc = run_cmd(preprocess_cmd(files, tok, tmp_path / "o"), timeout=60, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_interrupted_run_leaves_no_files(tok_dir: Path, tmp_path: Path) -> None:
    """SIGTERM while temporary shards exist on disk: the writer deletes every one of them.

    One shard per document (``--shard-size-tokens 1``) keeps the builder writing for seconds after its
    first file appears (measured: 2,000 shards in 2.5 s on 2 busy cores), so the signal lands mid-write.
    """
    data = write_jsonl(tmp_path / "d.jsonl", make_corpus(3000, seed=3))
    out = tmp_path / "out"
    out.mkdir()
    cmd = preprocess_cmd([str(data)], tok_dir, out / "x", "--chunk-bytes", "2000", "--shard-size-tokens", "1")
    proc = subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120  # the builder's megatron import takes ~10 s
        while not (seen := [p.name for p in out.iterdir()]):
            assert proc.poll() is None, "preprocess ended before writing any file"
            assert time.monotonic() < deadline, "no temporary file appeared within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert all(".tmp-" in name for name in seen), seen  # what was on disk when the signal went out
    assert proc.returncode == 128 + signal.SIGTERM  # interrupted, not finished before the signal
    assert list(out.iterdir()) == []


def test_json_key_selects_the_field() -> None:
    assert parse_jsonl_line(b'{"body": "x y", "text": 1}', "body") == (b"x y", None)
    assert parse_jsonl_line(b'{"body": "x"}', "text") == (b"", "missing_key")


def test_dtype_follows_vocab_size() -> None:
    assert choose_dtype(1000) is np.uint16
    assert choose_dtype(65499) is np.uint16
    assert choose_dtype(65500) is np.int32
    assert choose_dtype(128256) is np.int32
