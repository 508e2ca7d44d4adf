"""Synthetic fine-tuning tasks and a tiny tokenizer for them (letters as single tokens)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from tests.conftest import REPO, run_cmd

LETTERS = "abcdefgh"
MARKERS = {"k": "sport", "m": "tech", "p": "food"}  # classify: the one marker letter in a text
SFT_TINY = str(REPO / "configs" / "sft-tiny.yaml")
CLASSIFY_TINY = str(REPO / "configs" / "classify-tiny.yaml")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer(root: Path) -> Path:
    """BPE tokenizer whose pieces are single letters (texts are letters separated by spaces), with the
    chat template's role headers as special tokens and bigtrain's default chat template stored."""
    rng = random.Random(0)
    alphabet = LETTERS + "".join(MARKERS)
    docs = [" ".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8))) for _ in range(300)]
    corpus = write_jsonl(root / "tok_corpus.jsonl", [{"text": d} for d in docs])
    out = root / "tokenizer"
    run_cmd(
        [sys.executable, "-m", "tokenizer.train", "--input", str(corpus), "--vocab-size", "310", "--output",
         str(out), "--special-tokens", "<|system|>", "<|user|>", "<|assistant|>"],
        timeout=120,
    )  # fmt: skip
    run_cmd([sys.executable, "-m", "bigtrain.finetune.chat_template", "--tokenizer", str(out)], timeout=60)
    return out


def reverse_rows(words: list[str]) -> list[dict]:
    return [{"prompt": w, "response": " ".join(reversed(w.split()))} for w in words]


def reverse_split(n_train: int, n_test: int, length: int = 3, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint train / held-out letter sequences ("c a f" -> "f a c")."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n_train + n_test:
        words.add(" ".join(rng.choice(LETTERS) for _ in range(length)))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return ordered[:n_train], ordered[n_train:]


def classify_rows(n: int, seed: int) -> list[dict]:
    """Texts of 3-6 letters with one marker letter at a random place; the marker decides the label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        marker = rng.choice(sorted(MARKERS))
        letters.insert(rng.randint(0, len(letters)), marker)
        rows.append({"text": " ".join(letters), "label": MARKERS[marker]})
    return rows


def export(checkpoint: Path, out: Path, *extra: str) -> Path:
    """tools/convert_to_hf.py: a fine-tuning checkpoint (or RUN_DIR/best) -> an HF directory."""
    run_cmd([sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--checkpoint", str(checkpoint),
             "--output", str(out), *extra], timeout=180)  # fmt: skip
    return out


def reader_weights(path: Path) -> dict:
    """Full (tensor-parallel shards merged) fp32 weights of a checkpoint's weights/, by layout key."""
    from bigtrain.checkpoint import WeightReader
    from bigtrain.config import config_from_dict
    from bigtrain.finetune.params import task_params
    from bigtrain.models import layout

    reader = WeightReader(path)
    ft = config_from_dict(reader.meta["config"])
    return {lp.key: reader.full(lp) for lp in layout.iter_layer_params(ft.model, task=task_params(ft))}
