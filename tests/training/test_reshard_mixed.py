"""Resharding beyond fp32 start-up (tests/training/test_reshard_resume.py has the acceptance pairs): fp16's
loss scale survives a change of data-parallel size and ZeRO stage, and a loss-spike rollback to a
checkpoint of the previous layout re-injects its state into the trained engine."""

from __future__ import annotations

import json
import shutil

import pytest

from bigtrain.checkpoint_files import set_latest
from tests.training.helpers import assert_close_rel, metrics, rows, torchrun, train_args, write_corpus
from tests.training.test_reliability import needs_precision

pytestmark = pytest.mark.slow

CHECK = "bitwise equal"


def _step10(run, into):
    """``run``'s directory as a kill right after the step-10 checkpoint leaves it."""
    shutil.copytree(run, into)
    shutil.rmtree(into / "checkpoints" / "step_00000020", ignore_errors=True)
    set_latest(into / "checkpoints", "step_00000010")
    kept = [
        line
        for line in (into / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("step", 0) <= 10
    ]
    (into / "metrics.jsonl").write_text("".join(f"{line}\n" for line in kept))  # what the relaunch appends to
    return into


@needs_precision("fp16")
def test_fp16_loss_scale_and_moments_follow_a_data_parallel_and_zero_change(tmp_path):
    """fp16 at DP2 ZeRO-1 with an overflow at step 3 (the scale halves), resumed at DP1 ZeRO-2 after step
    10: the loss scale continues at the halved value, not the initial one, and the losses follow."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    common = ["checkpoint.interval=10", "checkpoint.keep_last=5", "optim.warmup_steps=3", "precision=fp16",
              "fp16.hysteresis=1", "debug.inject_spike_at_step=3", "debug.spike_factor=1.0e+20"]  # fmt: skip

    def args(run, *extra):
        return ["--fp16=on", "bigtrain.pretrain", *train_args(corpus, run, *common, *extra, steps=20)]

    reference = tmp_path / "reference"
    torchrun(2, args(reference, "zero.stage=1"), module="tests.entry_point")
    run = _step10(reference, tmp_path / "run")
    out = torchrun(1, args(run, "zero.stage=2", "debug.check_reshard=true"), module="tests.entry_point")
    assert "saved at TP1 PP1 DP2 ZeRO-1 into TP1 PP1 DP1 ZeRO-2 (resharding optimizer state)" in out.stdout
    assert f"debug.check_reshard: 15 parameters x 3 states {CHECK}" in out.stdout
    ref = {r["step"]: r for r in metrics(reference)}
    assert ref[4]["loss_scale"] == ref[2]["loss_scale"] / 2  # the overflow halved it
    resumed = [r for r in metrics(run) if r["step"] > 10]
    assert [r["step"] for r in resumed] == list(range(11, 21))
    assert all(r["loss_scale"] == ref[r["step"]]["loss_scale"] for r in resumed)
    assert all(r["consumed_samples"] == ref[r["step"]]["consumed_samples"] for r in resumed)
    assert_close_rel([r["loss"] for r in resumed], [ref[r["step"]]["loss"] for r in resumed], 1e-4)


def test_spike_rollback_to_a_checkpoint_of_the_previous_layout_reinjects_it(tmp_path):
    """Saved at DP2 ZeRO-1, resumed at DP2 ZeRO-3; a spike at step 13 rolls back to that step-10
    checkpoint (the previous layout), so its state is injected again into the trained engine (the
    ZeRO-3 partitions of the model re-derived from the masters): steps 11 and 12 rerun with bitwise
    the same losses."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    common = ["checkpoint.interval=10", "checkpoint.keep_last=5", "optim.warmup_steps=3",
              "train.spike_sigma=3", "train.spike_min_history=3", "train.spike_rollback=true"]  # fmt: skip
    source = tmp_path / "source"
    torchrun(2, train_args(corpus, source, *common, "zero.stage=1", steps=10))
    spike = ["zero.stage=3", "debug.inject_spike_at_step=13", "debug.check_reshard=true"]
    out = torchrun(2, train_args(corpus, source, *common, *spike, "checkpoint.interval=100", steps=16))
    assert "resumed from step 10" in out.stdout and "rolled back to step_00000010" in out.stdout
    assert out.stdout.count(f"debug.check_reshard: 15 parameters x 3 states {CHECK}") == 2
    train = [r for r in rows(source) if "loss" in r and "threshold" not in r and r["step"] > 10]
    for step in (11, 12):
        losses = [r["loss"] for r in train if r["step"] == step]
        assert len(losses) == 2 and losses[0] == losses[1], (step, losses)
    meta = json.loads((source / "checkpoints" / "step_00000016" / "bigtrain.json").read_text())
    assert meta["rollbacks"] == 1 and meta["layout"]["data_parallel"] == 2
