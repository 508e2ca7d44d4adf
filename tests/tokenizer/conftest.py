"""Fixtures for the tokenizer tests: one tiny BPE tokenizer trained once per session by the real CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import run_cmd
from tests.tokenizer.corpus import make_corpus, write_jsonl

TRAIN_DOCS = 400
VOCAB = 1000


@pytest.fixture(scope="session")
def train_docs() -> list[str]:
    return make_corpus(TRAIN_DOCS, seed=1)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, train_docs: list[str]) -> Path:
    """``python -m tokenizer.train`` output (BPE, vocab 1000, one extra special token)."""
    root = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(root / "train.jsonl", train_docs)
    out = root / "bpe"
    run_cmd(
        [sys.executable, "-m", "tokenizer.train", "--input", str(corpus), "--vocab-size", str(VOCAB),
         "--output", str(out), "--special-tokens", "<|sep|>"],
        timeout=180,
    )  # fmt: skip
    return out
