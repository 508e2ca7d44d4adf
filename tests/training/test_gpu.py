"""The tiny config on one GPU through the real entry point: bf16 with fp32 masters, flash attention,
DeepSpeed's fused Adam. It learns, logs MFU and GPU memory, resumes from its checkpoint, and its
checkpoint exports to a Hugging Face model that generates what bigtrain's own model generates.
Marked ``gpu``: reported as skipped where there is no CUDA device."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bigtrain import flops
from tests.conftest import REPO, gpu_env, run_cmd, run_with_port
from tests.training.helpers import metrics, train_args, write_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def _on_gpu(args: list[str]):
    return run_with_port(
        lambda port: [sys.executable, "-m", "bigtrain.pretrain", *args],
        timeout=600,
        env_for=lambda port: gpu_env(MASTER_PORT=str(port)),
    )


def _greedy(source: str, path: Path) -> list[int]:
    cmd = [
        sys.executable,
        str(REPO / "tools" / "generate.py"),
        source,
        str(path),
        "--prompt-ids",
        "1,40,43,46",
    ]
    proc = run_cmd([*cmd, "--greedy", "--max-new-tokens", "16", "--ignore-eos", "--json"], timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])["new_ids"]


def test_tiny_bf16_on_one_gpu_learns_resumes_and_exports(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    on_gpu = ["train.device=cuda", "precision=bf16", "checkpoint.interval=20", "logging.tensorboard=false"]
    on_gpu.append("data.train_samples=352")  # 44 steps x 8: the relaunch extends 40 -> 44 in the same order
    first = _on_gpu(train_args(corpus, run, *on_gpu, steps=40))
    assert "attention: SDPA flash kernel" in first.stdout + first.stderr, first.stdout[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    peak = flops.peak_tflops(torch.device("cuda"), None)  # None: a GPU missing from the table (no MFU)
    assert all(r["mem_gib"] > 0 and (not peak or 0 < r["mfu"] < 1) for r in rows)

    second = _on_gpu(train_args(corpus, run, *on_gpu, steps=44))
    assert "resumed from step 40" in second.stdout + second.stderr
    rows = metrics(run)
    assert [r["step"] for r in rows][-4:] == [41, 42, 43, 44]
    assert max(r["loss"] for r in rows[-4:]) < rows[0]["loss"] - 0.5  # continued, not restarted

    hf = tmp_path / "hf"
    run_cmd([sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--checkpoint", str(run / "checkpoints"),
             "--output", str(hf)], timeout=300)  # fmt: skip
    assert _greedy("--hf", hf) == _greedy("--checkpoint", run / "checkpoints")
