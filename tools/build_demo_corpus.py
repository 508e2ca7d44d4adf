"""Build a small real-text corpus from text every Python installation carries (no downloads).

English prose: the reference-manual topics of ``pydoc_data.topics``; code: the standard library's
top-level modules. Written as JSONL (``{"text": ...}``), one document per topic or module, in a
fixed shuffled order, with every 20th document held out to ``valid.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
from pathlib import Path


def documents(max_code_files: int) -> list[str]:
    from pydoc_data.topics import topics

    docs = [text.strip() for _, text in sorted(topics.items()) if text.strip()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code_files = sorted(stdlib.glob("*.py"))[:max_code_files]
    for path in code_files:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(text)
    return docs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="directory for train.jsonl and valid.jsonl")
    parser.add_argument("--max-code-files", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    docs = documents(args.max_code_files)
    random.Random(args.seed).shuffle(docs)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as train, open(out / "valid.jsonl", "w") as valid:
        for i, text in enumerate(docs):
            (valid if i % 20 == 19 else train).write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    size = (out / "train.jsonl").stat().st_size
    print(f"wrote {len(docs)} documents ({size / 1e6:.1f} MB train) to {out}")


if __name__ == "__main__":
    main()
