"""The bert family on the 3D-parallel engine: per-step MLM+NSP losses over 10 steps at TP2, PP2, TP2xPP2,
DP2 with ZeRO-1 and ZeRO-3 equal the single-process run (fp32, 1e-5 relative), with gradient clipping
active in every step; a `kill -9` at step 7 and a relaunch continue the DP2 curve exactly (masks and
sentence pairs are a function of the sample index). Controls: the last pipeline stage's head parameters
left out of the gradient norm (``compat.count_tied_head_params`` disabled) moves the PP2 losses."""

from __future__ import annotations

import sys

import pytest

from bigtrain.checkpoint import latest_tag
from tests.conftest import REPO, run_cmd, run_with_port
from tests.training.helpers import (
    assert_close_rel,
    assert_refused_before_start_up,
    losses,
    metrics,
    single,
    torchrun,
    write_bert_corpus,
)

pytestmark = pytest.mark.slow

BERT_TINY = str(REPO / "configs" / "bert-tiny.yaml")
# a clip far below the tiny model's gradient norm: every step clips, so a norm that leaves out (or
# double counts) any parameter changes the update
CLIP = "optim.grad_clip=0.05"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_bert_corpus(tmp_path_factory.mktemp("bert-corpus"))


def bert_args(corpus, run_dir, *overrides: str, steps: int = 10) -> list[str]:
    _, tokenizer, prefix = corpus
    return [
        "--config",
        BERT_TINY,
        "--set",
        "data.mock=false",
        f"data.train={prefix}",
        f"data.tokenizer={tokenizer}",
        'data.split="100,0,0"',
        "model.vocab_size=null",
        f"train.steps={steps}",
        f"train.run_dir={run_dir}",
        "optim.lr=0.01",
        "optim.min_lr=0.001",
        CLIP,
        *overrides,
    ]


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("bert-baseline")
    single(bert_args(corpus, run, "checkpoint.save=false"))
    values = losses(run)
    assert len(values) == 10
    assert min(values[1:]) < values[0] - 0.1, f"training must move the loss: {values}"
    return values


LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "tp2-pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "dp2-zero1": (2, ["zero.stage=1"]),
    # persistence threshold 0: ZeRO-3 really partitions every tensor (the default keeps tiny ones whole)
    "dp2-zero3": (2, ["zero.stage=3", "zero.stage3_param_persistence_threshold=0"]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_bert_layouts_match_single_process(name, corpus, baseline, tmp_path):
    nproc, overrides = LAYOUTS[name]
    torchrun(nproc, bert_args(corpus, tmp_path, "checkpoint.save=false", *overrides))
    assert_close_rel(losses(tmp_path), baseline, 1e-5)


def test_pp2_without_the_head_in_the_grad_norm_differs(corpus, baseline, tmp_path):
    """Control for the PP2 parity: with the head's parameters marked pipeline-replicated (DeepSpeed's
    own marking), the clipped updates differ from the single process."""

    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "tests.entry_point",
            "--without-patch=count_tied_head_params",
            "bigtrain.pretrain",
            *bert_args(corpus, tmp_path, "checkpoint.save=false", "parallel.pipeline=2"),
        ]

    run_with_port(command, timeout=420)
    values = losses(tmp_path)
    worst = max(abs(a - b) / abs(b) for a, b in zip(values, baseline))
    assert worst > 1e-4, f"the control must move the losses: {worst:.2e}"


def test_kill9_then_relaunch_continues_exactly(corpus, tmp_path):
    common = ["checkpoint.interval=5", "checkpoint.keep_last=2", "zero.stage=1"]
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(2, bert_args(corpus, full, *common))
    crashed = torchrun(
        2, bert_args(corpus, split, *common, "debug.crash_at_step=7", "debug.fault_rank=1"), check=False
    )
    assert crashed.returncode != 0
    assert latest_tag(split / "checkpoints") == "step_00000005"
    out = torchrun(2, bert_args(corpus, split, *common))
    assert "resumed from step 5" in out.stdout
    uninterrupted = {r["step"]: r for r in metrics(full)}
    resumed = [r for r in metrics(split) if r["step"] > 5][-5:]
    assert [r["step"] for r in resumed] == list(range(6, 11))
    for r in resumed:
        ref = uninterrupted[r["step"]]
        assert abs(r["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (r, ref)
        assert r["consumed_samples"] == ref["consumed_samples"]


def test_bf16_with_recomputation_follows_the_fp32_curve(corpus, baseline, tmp_path):
    """bf16 (fp32 masters) with full activation checkpointing at PP2 x TP2 trains the same curve within
    bf16's rounding (measured: see the assertion message on failure)."""
    overrides = [
        "precision=bf16",
        "parallel.pipeline=2",
        "parallel.tensor=2",
        "activation_checkpointing=full",
    ]
    torchrun(4, bert_args(corpus, tmp_path, "checkpoint.save=false", *overrides))
    assert_close_rel(losses(tmp_path), baseline, 2e-2)


def test_unsplit_data_is_refused_before_start_up(corpus, tmp_path):
    """Data written without --split-sentences (one sequence per document) cannot give sentence pairs:
    pre-flight says so in one line, naming the file and the remedy."""
    text, tokenizer, _ = corpus
    prefix = tmp_path / "unsplit" / "train"
    run_cmd(
        [
            sys.executable,
            "-m",
            "tokenizer.preprocess",
            "--input",
            str(text / "train.jsonl"),
            "--tokenizer",
            str(tokenizer),
            "--output-prefix",
            str(prefix),
        ]
    )
    args = bert_args(corpus, tmp_path / "run", f"data.train={prefix}")
    proc = single(args, no_start_up=True, check=False)
    assert_refused_before_start_up(
        proc, f"{prefix}.meta.json: written without --split-sentences", "--split-sentences`"
    )
