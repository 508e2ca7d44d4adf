"""`kill -9` of one rank at step 7 (checkpoints every 5), then the same command again: the job resumes
from step 5 and steps 6-20 equal the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from bigtrain.checkpoint import latest_tag, list_tags
from tests.training.helpers import assert_close_rel, metrics, single, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "overrides, killed_rank",
    [(["zero.stage=1"], 1), (["parallel.pipeline=2"], 0)],
    ids=["dp2-zero1", "pp2"],
)
def test_kill9_one_rank_then_relaunch_continues_the_same_curve(overrides, killed_rank, tmp_path):
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    common = ["checkpoint.interval=5", "checkpoint.keep_last=2", "optim.warmup_steps=3", *overrides]
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(2, train_args(corpus, full, *common, steps=20))
    kill = ["debug.crash_at_step=7", f"debug.fault_rank={killed_rank}"]
    crashed = torchrun(2, train_args(corpus, split, *common, *kill, steps=20), check=False)
    assert crashed.returncode != 0
    assert f"debug.crash_at_step: SIGKILL to rank {killed_rank} after step 7" in crashed.stdout
    assert latest_tag(split / "checkpoints") == "step_00000005"
    out = torchrun(2, train_args(corpus, split, *common, steps=20))
    assert "resumed from step 5" in out.stdout

    uninterrupted = {r["step"]: r for r in metrics(full)}
    resumed = [r for r in metrics(split) if r["step"] > 5][-15:]
    assert [r["step"] for r in resumed] == list(range(6, 21))
    for r in resumed:
        ref = uninterrupted[r["step"]]
        assert abs(r["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (r, ref)
        assert r["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert r["consumed_samples"] == ref["consumed_samples"]
    # keep_last=2 retention, except the checkpoint this run resumed from; the config travels along
    assert list_tags(split / "checkpoints") == ["step_00000005", "step_00000015", "step_00000020"]
    meta = json.loads((split / "checkpoints" / "step_00000020" / "bigtrain.json").read_text())
    assert meta["consumed_samples"] == 20 * 8 and meta["config"]["train"]["steps"] == 20


def test_weights_only_load_at_another_layout(tmp_path):
    """checkpoint.load starts from trained weights at step 0 with a fresh optimizer, at any TP/PP."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    source = tmp_path / "source"
    single(train_args(corpus, source, steps=6))
    tp1, tp2pp2 = tmp_path / "tp1", tmp_path / "tp2pp2"
    load = f"checkpoint.load={source / 'checkpoints'}"
    out = single(train_args(corpus, tp1, load, "checkpoint.save=false", steps=3))
    assert "loaded weights from" in out.stdout
    torchrun(
        4,
        train_args(
            corpus, tp2pp2, load, "checkpoint.save=false", "parallel.tensor=2", "parallel.pipeline=2", steps=3
        ),
    )
    fresh = metrics(source)[0]
    loaded, resharded = metrics(tp1), metrics(tp2pp2)
    assert [r["step"] for r in loaded] == [1, 2, 3]
    assert loaded[0]["loss"] < fresh["loss"] - 0.05, "the trained weights were not loaded"
    assert_close_rel([r["loss"] for r in resharded], [r["loss"] for r in loaded], 1e-4)
