"""Build the encoder demo's corpus: text with a rule an encoder can learn in minutes on a CPU.

Every sentence counts up (or down) through consecutive number words ("twelve thirteen fourteen
fifteen ."); a document is a run of sentences that continue one another, so the next-sentence task is
learnable too. What a masked word must be follows from its neighbours (its predecessor's successor),
so held-out sentences, whose (start, length, direction) never occur in training, test the rule and
not memory. Written, under ``--output``:

- ``train.jsonl``, ``valid.jsonl``: ``{"text": ...}`` documents, one sentence per line;
- ``fill_mask.jsonl``: held-out sentences with one inner word replaced by ``[MASK]`` (each in turn) and
  the ``answer``;
- ``classify_train.jsonl``, ``classify_valid.jsonl``: ``{"text": ..., "label": "up"|"down"}``, whether
  a held-out-style sentence counts up or down (fine-tuning's task).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()


def sentence(start: int, length: int, step: int) -> list[str]:
    """``length`` consecutive number words from ``WORDS[start]``, counting by ``step`` (+1 or -1)."""
    return [WORDS[start + step * i] for i in range(length)]


def all_shapes() -> list[tuple[int, int, int]]:
    """Every (start, length, step) whose words stay inside WORDS, lengths 4 to 8."""
    out = []
    for step in (1, -1):
        for length in range(4, 9):
            for start in range(len(WORDS)):
                end = start + step * (length - 1)
                if 0 <= end < len(WORDS):
                    out.append((start, length, step))
    return out


def split_shapes(seed: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(train shapes, held-out shapes): every 7th shape of a seeded shuffle is held out."""
    shapes = all_shapes()
    random.Random(seed).shuffle(shapes)
    held = shapes[::7]
    return [s for s in shapes if s not in held], held


def document(rng: random.Random, shapes: list[tuple[int, int, int]]) -> str:
    """2 to 5 sentences, each continuing the last where it can (same direction, the next word)."""
    lines = []
    start, length, step = rng.choice(shapes)
    for _ in range(rng.randint(2, 5)):
        lines.append(" ".join(sentence(start, length, step)) + " .")
        nxt = [s for s in shapes if s[2] == step and s[0] == start + step * length]
        if not nxt:
            break
        start, length, step = rng.choice(nxt)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="directory for the files listed above")
    parser.add_argument("--documents", type=int, default=4000, help="training documents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    train_shapes, held = split_shapes(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, records: list[dict]) -> None:
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    write("train.jsonl", [{"text": document(rng, train_shapes)} for _ in range(args.documents)])
    write("valid.jsonl", [{"text": document(rng, train_shapes)} for _ in range(max(args.documents // 20, 1))])
    fill = []
    for start, length, step in held:
        words = sentence(start, length, step)
        for i in range(1, length - 1):  # each inner word: both neighbours say what it is
            text = " ".join(words[:i] + ["[MASK]"] + words[i + 1 :]) + " ."
            fill.append({"text": text, "answer": words[i]})
    write("fill_mask.jsonl", fill)

    def labelled(shapes: list[tuple[int, int, int]], n: int) -> list[dict]:
        picks = [rng.choice(shapes) for _ in range(n)]
        return [
            {"text": " ".join(sentence(*s)) + " .", "label": "up" if s[2] == 1 else "down"} for s in picks
        ]

    write("classify_train.jsonl", labelled(train_shapes, 400))
    write("classify_valid.jsonl", labelled(held, 100))
    print(f"wrote {args.documents} documents, {len(fill)} fill-mask probes to {out}")


if __name__ == "__main__":
    main()
