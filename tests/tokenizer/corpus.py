"""Deterministic mixed-language test documents: English, Chinese, code, emoji and odd whitespace.

Small on purpose (tiny tokenizers train in a second or two) but covering what breaks tokenizers:
runs of spaces, tabs, whitespace-only lines, leading/trailing blanks, CJK and emoji (byte fallback).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ENGLISH = (
    "the model reads tokens from the dataset and learns to predict the next one while the optimizer "
    "updates every weight after each step of training on many machines with careful checkpoints"
).split()
CHINESE = "我们今天学习中文分词模型训练数据处理的方法和技术并且在很多机器上运行大型语言模型"
JAPANESE = "日本語のテキストを読み込んでトークンに分割します"
EMOJI = ["😀", "🚀", "👍🏽", "🎉", "🔥", "✨", "🇫🇷", "🤖"]
CODE = (
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += values[i];\n}\n",
    "class Loader:\n    def __init__(self, path):\n        self.path = path  # 12345\n",
    'if x != None and y >= 10:\n        print(f"{x}:{y}")\n',
    "SELECT id, name FROM users WHERE age > 42 ORDER BY name;\n",
)
ODD_LINES = (
    "   ",
    "\t\t",
    "  leading and trailing  ",
    "many     inner     spaces",
    "tab\tseparated\tline",
    "",
)


def make_document(rng: random.Random) -> str:
    """One document of 3-12 mixed lines."""
    lines = []
    for _ in range(rng.randint(3, 12)):
        kind = rng.randrange(6)
        if kind == 0:
            words = rng.choices(ENGLISH, k=rng.randint(4, 16))
            lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
        elif kind == 1:
            start = rng.randrange(len(CHINESE) - 8)
            lines.append(CHINESE[start : start + rng.randint(4, 20)] + "。")
        elif kind == 2:
            lines.append(rng.choice(CODE).rstrip("\n"))
        elif kind == 3:
            lines.append(
                " ".join(rng.choices(ENGLISH, k=3)) + " " + "".join(rng.choices(EMOJI, k=rng.randint(1, 3)))
            )
        elif kind == 4:
            lines.append(rng.choice(ODD_LINES))
        else:
            lines.append(JAPANESE[: rng.randint(4, len(JAPANESE))] + f" {rng.randint(0, 99999)}")
    return "\n".join(lines)


def make_corpus(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make_document(rng) for _ in range(n_docs)]


def held_out_lines() -> list[str]:
    """Lines never seen in training: fresh random text plus hand-picked edge cases."""
    edge = [
        "",
        " ",
        "    ",
        "\t",
        " \t \t ",
        "  two leading spaces",
        "trailing spaces   ",
        "a  b   c    d",
        "tabs\tin\t\tthe\tmiddle",
        "rare CJK 𠀋𡈽𪚲 and 龘 and Hangul 한국어",
        "emoji only 🧪🧬🛰️👩‍👩‍👧‍👦",
        "Ünïcödé àccents — “quotes” … ellipsis ½ ™",
        "numbers 3.14159 2026-11-23 0xDEADBEEF 1e-9",
        "literal specials <s> </s> <unk> <pad> <0x41>",
        'print("hello")\t# comment  ',
    ]
    text = "\n".join(make_corpus(20, seed=12345))
    return edge + text.split("\n")


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc}, ensure_ascii=False) + "\n")
    return path
