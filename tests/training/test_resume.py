"""A job killed after step 10 and relaunched with the same command and run_dir resumes exactly:
steps 11-20 equal the uninterrupted run."""

from __future__ import annotations

import json

import pytest

from bigtrain.checkpoint import latest_tag, list_tags
from tests.training.helpers import metrics, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("overrides", [["zero.stage=1"], ["parallel.pipeline=2"]], ids=["dp2-zero1", "pp2"])
def test_resume_continues_the_same_curve(overrides, tmp_path):
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    common = ["checkpoint.interval=10", "checkpoint.keep_last=2", "optim.warmup_steps=3", *overrides]
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(2, train_args(corpus, full, *common, steps=20))
    crashed = torchrun(2, train_args(corpus, split, *common, "debug.crash_at_step=10", steps=20), check=False)
    assert crashed.returncode != 0
    assert latest_tag(split / "checkpoints") == "step_00000010"
    out = torchrun(2, train_args(corpus, split, *common, steps=20))
    assert "resumed from step 10" in out.stdout

    uninterrupted = {r["step"]: r for r in metrics(full)}
    resumed = [r for r in metrics(split) if r["step"] > 10]
    assert [r["step"] for r in resumed] == list(range(11, 21))
    for r in resumed:
        ref = uninterrupted[r["step"]]
        assert abs(r["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (r, ref)
        assert r["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert r["consumed_samples"] == ref["consumed_samples"]
    # keep_last=2 retention, and the saved config travels with the checkpoint
    assert list_tags(split / "checkpoints") == ["step_00000010", "step_00000020"]
    meta = json.loads((split / "checkpoints" / "step_00000020" / "bigtrain.json").read_text())
    assert meta["consumed_samples"] == 20 * 8 and meta["config"]["train"]["steps"] == 20
