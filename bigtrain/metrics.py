"""Where numbers go: console progress line, ``RUN_DIR/metrics.jsonl`` and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step":
                    for tag, scalar in _scalars(f"{prefix}/{key}", value):
                        self.tb.add_scalar(tag, scalar, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _scalars(tag: str, value: Any) -> list[tuple[str, float]]:
    """TensorBoard scalars of one record value: a number as it is, a (nested) list one scalar per
    entry tagged with its indices (``train/moe_expert_fraction/0/3``: block 0, expert 3); other values
    (strings, booleans, null) none."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(tag, value)]
    if isinstance(value, list):
        return [pair for i, v in enumerate(value) for pair in _scalars(f"{tag}/{i}", v)]
    return []


def console(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


# ---------------------------------------------------------------------------- classification: entities
Entity = tuple[str, int, int]  # (type, first position, last position)


def iob2_entities(tags: list[str]) -> list[Entity]:
    """The entities of one IOB2 tag sequence as seqeval's default (conlleval) mode reads them: ``B-X``
    starts an entity; ``I-X`` continues the entity before it when that is of type X, else starts one (an
    ``I-`` after ``O`` or after another type, as conlleval counts ill-formed tags); ``O`` ends it.
    ``tags``: "O", "B-TYPE" or "I-TYPE" (ValueError naming a tag that is none of them)."""
    entities: list[Entity] = []
    start, kind = -1, ""  # the open entity (start -1: none)
    for i, tag in enumerate(tags):
        if tag == "O":
            prefix, tag_type = "O", ""
        elif tag[:2] in ("B-", "I-") and tag[2:]:
            prefix, tag_type = tag[0], tag[2:]
        else:
            raise ValueError(f"tag {tag!r} at position {i} is not an IOB2 tag (O, B-TYPE or I-TYPE)")
        continues = prefix == "I" and start >= 0 and tag_type == kind
        if start >= 0 and not continues:
            entities.append((kind, start, i - 1))
            start = -1
        if prefix != "O" and not continues:
            start, kind = i, tag_type
    if start >= 0:
        entities.append((kind, start, len(tags) - 1))
    return entities


def _prf(correct: int, predicted: int, true: int) -> dict[str, float]:
    p = correct / predicted if predicted else 0.0
    r = correct / true if true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_scores(true: list[list[str]], pred: list[list[str]]) -> dict[str, dict[str, float]]:
    """Entity-level precision/recall/F1 (an entity counts when its type and span match exactly) as
    seqeval's ``classification_report`` computes them in its default mode: per entity type (with
    ``support``, the true entities of that type) and ``"micro"`` over all (seqeval's ``f1_score``). A
    score with nothing to divide by is 0. ``true``/``pred``: tag sequences, pairwise of one length."""
    if len(true) != len(pred) or any(len(t) != len(p) for t, p in zip(true, pred)):
        raise ValueError("entity_scores: true and predicted tag sequences differ in number or length")
    gold: set[tuple[int, str, int, int]] = set()
    found: set[tuple[int, str, int, int]] = set()
    for n, (t, p) in enumerate(zip(true, pred)):
        gold.update((n, *e) for e in iob2_entities(t))
        found.update((n, *e) for e in iob2_entities(p))
    hits = gold & found
    out = {"micro": {**_prf(len(hits), len(found), len(gold)), "support": float(len(gold))}}
    for kind in sorted({e[1] for e in gold | found}):
        g, f, h = ({e for e in group if e[1] == kind} for group in (gold, found, hits))
        out[kind] = {**_prf(len(h), len(f), len(g)), "support": float(len(g))}
    return out
