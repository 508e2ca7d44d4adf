"""Benchmark tokenizer.preprocess against SentencePiece's own multi-threaded batch encode.

    python tools/bench_preprocess.py [--input corpus.jsonl] [--tokenizer DIR] [--repeats 3] [--json out.json]

Without ``--input`` it builds a JSONL corpus of ``--corpus-mb`` MB of English + code from the
Python standard library on this machine (``.py``/``.txt``/``.rst`` files, one document each, cycled
when the library is smaller than the target; no downloads). Without ``--tokenizer`` it trains an
8k BPE tokenizer on a sample of it with ``python -m tokenizer.train``.

Each repeat measures, on the same documents and with the same number of threads:

* SentencePiece alone: ``encode(all_docs, num_threads=W)`` on documents already in memory, both
  the default list-of-ids output and numpy output (the faster of the two is the baseline);
* the full ``python -m tokenizer.preprocess`` CLI as a subprocess: wall clock including
  interpreter start-up and the megatron import, plus its own summary (overall MB/s, the steady
  MB/s after start-up, time to first document).

Medians over the repeats are printed as a table with the ratio preprocess/SentencePiece.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizer import Tokenizer
from tokenizer.io import SkipCounter, iter_documents

REPO = Path(__file__).resolve().parent.parent

DOC_SUFFIXES = (".py", ".txt", ".rst")


def stdlib_documents() -> Iterator[str]:
    """Text of every standard-library source/doc file (site-packages excluded), in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*")):
        if path.suffix not in DOC_SUFFIXES or "site-packages" in path.parts or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield text


def build_corpus(out: Path, target_mb: float) -> tuple[int, int]:
    """Write a JSONL corpus of about ``target_mb`` MB of text; returns (documents, text bytes)."""
    docs = nbytes = 0
    with open(out, "w", encoding="utf-8") as f:
        while nbytes < target_mb * 1e6:
            before = nbytes
            for text in stdlib_documents():
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                docs += 1
                nbytes += len(text.encode("utf-8"))
                if nbytes >= target_mb * 1e6:
                    break
            if nbytes == before:
                raise RuntimeError("no standard-library text found to build a corpus from")
    return docs, nbytes


def load_documents(path: Path) -> list[str]:
    """The documents preprocess will see (same reader, same skipping), held in memory."""
    return [doc.decode("utf-8") for doc in iter_documents([path], "text", SkipCounter())]


def time_sentencepiece(tok: Tokenizer, docs: list[str], workers: int, numpy_out: bool) -> dict[str, float]:
    """One ``encode`` call over all documents with SentencePiece's thread pool; MB/s and tokens/s.

    ``numpy_out`` uses the same call as preprocess (UTF-8 bytes in, int32 arrays out); otherwise
    the public ``Tokenizer.encode_batch`` (str in, lists of ids out).
    """
    as_bytes = [d.encode("utf-8") for d in docs]
    nbytes = sum(map(len, as_bytes))
    cpu0, start = os.times(), time.perf_counter()
    if numpy_out:
        out = tok._encode_arrays(as_bytes, add_eos=False, num_threads=workers)
    else:
        out = tok.encode_batch(docs, num_threads=workers)
    elapsed, cpu1 = time.perf_counter() - start, os.times()
    # os.times counts whole clock ticks (10 ms): a faster encode reads 0 CPU seconds; bound it by one tick
    cpu = max(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 1 / os.sysconf("SC_CLK_TCK"))
    tokens = sum(len(ids) for ids in out)
    return {
        "mb_per_s": nbytes / 1e6 / elapsed,
        "tokens_per_s": tokens / elapsed,
        "seconds": elapsed,
        "mb_per_cpu_s": nbytes / 1e6 / cpu,
    }


def time_preprocess(corpus: Path, tok_dir: Path, workdir: Path, workers: int) -> dict[str, Any]:
    """Run the CLI as a user would; wall clock from spawn to exit, plus its own summary."""
    summary_file = workdir / "summary.json"
    cmd = [
        sys.executable, "-m", "tokenizer.preprocess", "--input", str(corpus), "--tokenizer", str(tok_dir),
        "--output-prefix", str(workdir / "bench"), "--workers", str(workers), "--summary-json", str(summary_file),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    s = json.loads(summary_file.read_text())
    cpu = s["cpu_s"] + s["builder_cpu_s"] - s["builder_import_cpu_s"]  # all work but the megatron import
    return {
        "mb_per_cpu_s": s["text_bytes"] / 1e6 / cpu,
        "builder_import_cpu_s": s["builder_import_cpu_s"],
        "wall_s": wall,
        "wall_mb_per_s": s["text_bytes"] / 1e6 / wall,
        "wall_tokens_per_s": s["tokens"] / wall,
        "mb_per_s": s["mb_per_s"],
        "tokens_per_s": s["tokens_per_s"],
        "steady_mb_per_s": s["steady_mb_per_s"],
        "steady_tokens_per_s": s["steady_tokens_per_s"],
        "first_doc_s": s["first_doc_s"],
        "builder_ready_s": s["builder_ready_s"],
        "tokens": s["tokens"],
        "text_bytes": s["text_bytes"],
    }


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    corpus = args.input
    if corpus is None:
        corpus = workdir / "corpus.jsonl"
        docs, nbytes = build_corpus(corpus, args.corpus_mb)
        print(f"corpus: {docs} documents, {nbytes / 1e6:.1f} MB from the standard library -> {corpus}")
    tok_dir = args.tokenizer
    if tok_dir is None:
        tok_dir = workdir / "tok8k"
        cmd = [sys.executable, "-m", "tokenizer.train", "--input", str(corpus), "--vocab-size", str(args.vocab_size),
               "--output", str(tok_dir), "--sample-docs", str(args.train_docs)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO)
    return corpus, tok_dir


def report(results: dict[str, Any]) -> None:
    m = results["medians"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    rows = [
        ("sentencepiece encode, ids (in memory)", m["sp_ids_mb_per_s"], m["sp_ids_tokens_per_s"]),
        ("sentencepiece encode, numpy (in memory)", m["sp_numpy_mb_per_s"], m["sp_numpy_tokens_per_s"]),
        ("preprocess steady state (after start-up)", m["steady_mb_per_s"], m["steady_tokens_per_s"]),
        ("preprocess overall (own figure)", m["pp_mb_per_s"], m["pp_tokens_per_s"]),
        ("preprocess wall clock incl. start-up", m["wall_mb_per_s"], m["wall_tokens_per_s"]),
    ]
    print(f"\n{'':44s} {'MB/s':>8s} {'tokens/s':>12s}   (median of {results['repeats']})")
    for name, mbs, tps in rows:
        print(f"{name:44s} {fmt(mbs, '8.2f'):>8s} {fmt(tps, '12,.0f'):>12s}")
    print(f"sentencepiece MB/s (baseline, best of ids/numpy): {fmt(m['sp_mb_per_s'], '.2f')}")
    print(f"preprocess MB/s (steady state): {fmt(m['steady_mb_per_s'], '.2f')}")
    print(f"time to first document: {fmt(m['first_doc_s'], '.2f')} s (megatron builder ready at "
          f"{fmt(m['builder_ready_s'], '.1f')} s, wall {fmt(m['wall_s'], '.1f')} s)")  # fmt: skip
    print(f"ratio preprocess/sentencepiece: steady {fmt(m['ratio_steady'], '.3f')}, "
          f"overall {fmt(m['ratio_overall'], '.3f')}, wall clock {fmt(m['ratio_wall'], '.3f')}")  # fmt: skip
    print(f"CPU efficiency: preprocess {fmt(m['mb_per_cpu_s'], '.2f')} MB per CPU-second (megatron import of "
          f"{fmt(m['builder_import_cpu_s'], '.1f')} CPU-s excluded), sentencepiece {fmt(m['sp_numpy_mb_per_cpu_s'], '.2f')}, "
          f"ratio {fmt(m['ratio_cpu'], '.3f')}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, help="JSONL corpus (default: built from the standard library)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: train an 8k BPE on the corpus)")
    p.add_argument("--corpus-mb", type=float, default=64.0)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--train-docs", type=int, default=1500, help="documents sampled to train the tokenizer")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--workdir", type=Path, help="where corpus, tokenizer and outputs go (default: a temp dir)"
    )
    p.add_argument("--json", type=Path, help="write all figures here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        corpus, tok_dir = prepare(args, workdir)
        tok = Tokenizer.load(tok_dir)
        docs = load_documents(corpus)
        runs = []
        for i in range(args.repeats):  # interleaved, so a busy moment hits all measurements alike
            run = {f"sp_ids_{k}": v for k, v in time_sentencepiece(tok, docs, args.workers, False).items()}
            run |= {f"sp_numpy_{k}": v for k, v in time_sentencepiece(tok, docs, args.workers, True).items()}
            run |= time_preprocess(corpus, tok_dir, workdir, args.workers)
            runs.append(run)
            print(f"repeat {i + 1}/{args.repeats}: sentencepiece {run['sp_ids_mb_per_s']:.2f}/"
                  f"{run['sp_numpy_mb_per_s']:.2f} MB/s (ids/numpy), preprocess steady "
                  f"{run['steady_mb_per_s']} MB/s, overall {run['mb_per_s']:.2f} MB/s, wall {run['wall_s']:.1f} s",
                  flush=True)  # fmt: skip
        for run in runs:
            run["sp_mb_per_s"] = max(run["sp_ids_mb_per_s"], run["sp_numpy_mb_per_s"])
            steady = run["steady_mb_per_s"]
            run["ratio_steady"] = None if steady is None else steady / run["sp_mb_per_s"]
            run["ratio_overall"] = run["mb_per_s"] / run["sp_mb_per_s"]
            run["ratio_wall"] = run["wall_mb_per_s"] / run["sp_mb_per_s"]
            run["ratio_cpu"] = run["mb_per_cpu_s"] / run["sp_numpy_mb_per_cpu_s"]
        keys = sorted({k for run in runs for k, v in run.items() if isinstance(v, (int, float))})
        medians = {k: median(runs, k) for k in keys}
        medians |= {k: median(runs, k) for k in ("steady_mb_per_s", "steady_tokens_per_s", "ratio_steady")}
        medians["pp_mb_per_s"], medians["pp_tokens_per_s"] = medians["mb_per_s"], medians["tokens_per_s"]
        results = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
            "versions": versions(),
            "workers": args.workers,
            "repeats": args.repeats,
            "corpus": str(corpus),
            "text_mb": runs[0]["text_bytes"] / 1e6,
            "tokens": runs[0]["tokens"],
            "vocab_size": tok.vocab_size,
            "runs": runs,
            "medians": medians,
        }
        report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def versions() -> dict[str, str]:
    import numpy
    import sentencepiece

    out = {
        "python": platform.python_version(),
        "sentencepiece": sentencepiece.__version__,
        "numpy": numpy.__version__,
    }
    try:
        from importlib.metadata import version

        out["megatron-core"] = version("megatron-core")
    except Exception:  # metadata missing only in unusual installs; the figure is informational
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
