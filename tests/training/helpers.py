"""Run real training jobs for tests: a small learnable corpus, launchers, metrics readers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tests.conftest import REPO, cpu_env, run_with_port

TINY = str(REPO / "configs" / "tiny.yaml")
MOE_TINY = str(REPO / "configs" / "moe-tiny.yaml")
VOCAB = 512


def write_corpus(prefix: Path, documents: int = 400, seed: int = 0, pad_runs: bool = False) -> Path:
    """Documents of short arithmetic token patterns (learnable, so losses move a lot in 10 steps).
    ``pad_runs``: every other document ends in 10-80 pad tokens (id 3, recorded in PREFIX.meta.json),
    which megatron-core's GPTDataset leaves out of the loss: samples train very different numbers of
    tokens (some none at all)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for index in range(documents):
        start, stride = rng.integers(4, VOCAB), rng.integers(1, 7)
        length = rng.integers(20, 120)
        doc = (start + stride * np.arange(length)) % (VOCAB - 4) + 4
        if pad_runs and index % 2:
            doc = np.append(doc, np.full(rng.integers(10, 80), 3))
        builder.add_document(np.append(doc, 2).astype(np.uint16), [len(doc) + 1])
    builder.finalize(f"{prefix}.idx")
    if pad_runs:
        Path(f"{prefix}.meta.json").write_text(json.dumps({"eod_id": 2, "pad_id": 3, "vocab_size": VOCAB}))
    return prefix


def write_bert_corpus(out: Path, documents: int = 1000) -> tuple[Path, Path, Path]:
    """The encoder demo's corpus (tools/build_bert_demo_corpus.py: number words counting up or down,
    held-out fill-mask probes, an up/down classification task) through the real entry points: a
    tokenizer with BERT's specials, sentence-split indexed data. Returns (text dir, tokenizer dir, data
    prefix)."""
    from tests.conftest import run_cmd

    text, tok, prefix = out / "text", out / "tokenizer", out / "data" / "train"
    if not (prefix.parent / "train.idx").exists():
        py = sys.executable
        run_cmd(
            [
                py,
                str(REPO / "tools" / "build_bert_demo_corpus.py"),
                "--output",
                str(text),
                "--documents",
                str(documents),
            ]
        )
        run_cmd(
            [
                py,
                "-m",
                "tokenizer.train",
                "--input",
                str(text / "train.jsonl"),
                "--vocab-size",
                "420",
                "--output",
                str(tok),
                "--bert-specials",
            ]
        )
        run_cmd(
            [
                py,
                "-m",
                "tokenizer.preprocess",
                "--input",
                str(text / "train.jsonl"),
                "--tokenizer",
                str(tok),
                "--output-prefix",
                str(prefix),
                "--split-sentences",
            ]
        )
    return text, tok, prefix


def train_args(
    corpus: Path, run_dir: Path, *overrides: str, steps: int = 10, config: str = TINY
) -> list[str]:
    return [
        "--config",
        config,
        "--set",
        f"data.train={corpus}",
        "data.mock=false",
        'data.split="100,0,0"',
        f"model.vocab_size={VOCAB}",
        f"train.steps={steps}",
        f"train.run_dir={run_dir}",
        "optim.lr=0.01",
        "optim.min_lr=0.001",
        *overrides,
    ]


def entry(module: str, args: list[str], no_start_up: bool = False) -> list[str]:
    """``-m MODULE ARGS``; with ``no_start_up`` the run is stopped (exit 97, ``START_UP_REACHED`` on
    stderr) if it gets as far as creating a process group (tests/entry_point.py)."""
    return (
        ["-m", "tests.entry_point", "--no-start-up", module, *args] if no_start_up else ["-m", module, *args]
    )


def torchrun(
    nproc: int,
    args: list[str],
    timeout: float = 420,
    module: str = "bigtrain.pretrain",
    no_start_up: bool = False,
    **kw,
):
    def command(port: int) -> list[str]:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={port}",
        ]
        return [*launcher, *entry(module, args, no_start_up)]

    return run_with_port(command, timeout=timeout, **kw)


def single(
    args: list[str], timeout: float = 300, module: str = "bigtrain.pretrain", no_start_up: bool = False, **kw
):
    command = [sys.executable, *entry(module, args, no_start_up)]
    return run_with_port(
        lambda port: command, timeout, env_for=lambda port: cpu_env(MASTER_PORT=str(port)), **kw
    )


def assert_refused_before_start_up(proc, *needles: str, returncode: int | None = 2) -> None:
    """A run launched with ``no_start_up=True`` stopped with a config error (exit 2 unless said) before
    any process group existed, its stderr holding every needle."""
    from tests.entry_point import START_UP_REACHED

    detail = (proc.returncode, proc.stdout[-1500:], proc.stderr[-3000:])
    assert START_UP_REACHED not in proc.stderr, detail
    if returncode is None:  # a launcher's own status (torchrun: 1 when a rank failed)
        assert proc.returncode != 0, detail
    else:
        assert proc.returncode == returncode, detail
    assert "step 1/" not in proc.stdout, detail
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def rows(run_dir: Path) -> list[dict]:
    """Every metrics.jsonl record of a run (training, validation, parameter counts)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    """Training rows of metrics.jsonl (validation rows excluded)."""
    return [r for r in rows(run_dir) if "loss" in r]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def curve(run_dir: Path) -> list[float]:
    """Per-step training losses, then the one validation loss (a run validating after its last step)."""
    (value,) = [r["val_loss"] for r in rows(run_dir) if "val_loss" in r]
    return [*losses(run_dir), value]


def assert_close_rel(a: list[float], b: list[float], rel: float) -> float:
    """Asserts the largest relative difference of ``a`` from ``b`` is at most ``rel``; returns it."""
    assert len(a) == len(b), (a, b)
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    assert worst <= rel, f"max relative difference {worst:.3e} > {rel:.0e}\n{a}\n{b}"
    return worst
