"""tools/bench_preprocess.py: smoke run on a tiny corpus (figures present, no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import REPO, run_cmd
from tests.tokenizer.corpus import make_corpus, write_jsonl


def test_bench_prints_figures_and_ratio(tok_dir: Path, tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_corpus(300, seed=5))
    out = tmp_path / "bench.json"
    proc = run_cmd(
        [sys.executable, str(REPO / "tools" / "bench_preprocess.py"), "--input", str(corpus), "--tokenizer",
         str(tok_dir), "--repeats", "1", "--workdir", str(tmp_path / "w"), "--json", str(out)],
        timeout=300,
    )  # fmt: skip
    text = proc.stdout
    for figure in (
        "sentencepiece MB/s",
        "preprocess MB/s",
        "time to first document",
        "ratio preprocess/sentencepiece",
    ):
        assert figure in text, figure
    results = json.loads(out.read_text())
    m = results["medians"]
    assert m["sp_mb_per_s"] > 0 and m["pp_mb_per_s"] > 0 and m["first_doc_s"] > 0
    assert m["ratio_overall"] > 0 and results["tokens"] > 0 and results["repeats"] == 1


def test_stdlib_corpus_builder(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_preprocess
    finally:
        sys.path.remove(str(REPO / "tools"))
    docs, nbytes = bench_preprocess.build_corpus(tmp_path / "c.jsonl", 0.2)
    lines = (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()
    assert docs == len(lines) > 0 and nbytes >= 0.2e6
    assert all(json.loads(line)["text"].strip() for line in lines)
