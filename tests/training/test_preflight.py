"""Mismatches are caught before step 1, within 10 s, each with a one-line error naming the field or
file: checkpoint shape, resume at another layout, token ids beyond the vocab, another tokenizer,
missing or corrupt index files."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cmd
from tests.training.helpers import single, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus and a run directory holding a 2-step checkpoint (tiny model, TP1/PP1)."""
    root = tmp_path_factory.mktemp("preflight")
    corpus = write_corpus(root / "corpus" / "patterns")
    run = root / "run"
    single(train_args(corpus, run, steps=2))
    return corpus, run


def fails_fast(proc, started: float, *needles: str) -> None:
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-3000:])
    assert "step 1/" not in proc.stdout, "training started"
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_weights_only_load_with_another_model_shape(trained, tmp_path):
    corpus, run = trained
    t0 = time.monotonic()
    out = single(
        train_args(corpus, tmp_path, f"checkpoint.load={run}", "model.hidden_size=96", "model.num_layers=3"),
        check=False,
    )
    fails_fast(
        out, t0, "model.num_layers: checkpoint 2 vs config 3", "model.hidden_size: checkpoint 64 vs config 96"
    )


def test_resume_with_another_model_shape(trained, tmp_path):
    corpus, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    t0 = time.monotonic()
    out = single(train_args(corpus, copy, "model.ffn_hidden_size=256"), check=False)
    fails_fast(
        out,
        t0,
        f"resuming from {copy / 'checkpoints' / 'step_00000002'}: ",
        "model.ffn_hidden_size: checkpoint 128 vs config 256",
        "keep model.ffn_hidden_size=128 to resume",
    )


def test_resume_at_another_parallel_layout(trained, tmp_path):
    corpus, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    t0 = time.monotonic()
    out = torchrun(2, train_args(corpus, copy, "parallel.tensor=2"), check=False)
    assert out.returncode != 0
    assert "was saved at parallel.tensor=1 parallel.pipeline=1" in out.stderr
    assert "checkpoint.load=" in out.stderr and "weights only, any layout" in out.stderr
    assert "step 1/" not in out.stdout
    assert time.monotonic() - t0 < 15  # torchrun's own start-up included


def test_token_ids_beyond_the_vocab(trained, tmp_path):
    corpus, _ = trained
    t0 = time.monotonic()
    out = single(train_args(corpus, tmp_path, "model.vocab_size=300"), check=False)
    fails_fast(out, t0, f"{corpus}.bin", "300")


def test_missing_and_corrupt_index(trained, tmp_path):
    corpus, _ = trained
    for damage in ("missing", "corrupt"):
        prefix = tmp_path / damage / "patterns"
        prefix.parent.mkdir()
        for ext in (".bin", ".idx"):
            shutil.copy(f"{corpus}{ext}", f"{prefix}{ext}")
        idx = Path(f"{prefix}.idx")
        if damage == "missing":
            idx.unlink()
        else:
            idx.write_bytes(b"not an index" * 10)
        t0 = time.monotonic()
        out = single(train_args(prefix, tmp_path / f"run-{damage}"), check=False)
        fails_fast(out, t0, str(idx))


def test_data_from_another_tokenizer(trained, tmp_path):
    corpus, _ = trained
    docs = tmp_path / "docs.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs.write_text(
        "".join(json.dumps({"text": " ".join(words[i:] + words[:i]) * 5}) + "\n" for i in range(200))
    )
    tok = tmp_path / "tok"
    run_cmd(
        [
            sys.executable,
            "-m",
            "tokenizer.train",
            "--input",
            str(docs),
            "--vocab-size",
            "400",
            "--output",
            str(tok),
        ],
        timeout=180,
    )
    prefix = tmp_path / "data" / "patterns"
    prefix.parent.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(f"{corpus}{ext}", f"{prefix}{ext}")
    meta = {"tokenizer_fingerprint": "0" * 64, "vocab_size": 400, "dtype": "uint16"}
    Path(f"{prefix}.meta.json").write_text(json.dumps(meta))
    args = train_args(prefix, tmp_path / "run", f"data.tokenizer={tok}")
    args.remove("model.vocab_size=512")  # taken from the tokenizer
    t0 = time.monotonic()
    out = single(args, check=False)
    fails_fast(out, t0, f"{prefix}.meta.json", "different tokenizer")
