"""Issue 18: sequence parallelism changes no weight, so a TP2 run saved at step 5 without it and resumed
with ``parallel.sequence_parallel: true`` (a field resume honours) continues the uninterrupted TP2 run:
steps 6-10 within 1e-5 relative (measured 7.7e-8 in a probe)."""

from __future__ import annotations

import shutil

import pytest

from bigtrain.checkpoint import latest_tag, list_tags
from bigtrain.checkpoint_files import set_latest
from tests.training.helpers import assert_close_rel, metrics, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow

STEPS, SAVED = 10, 5
TP2 = ["parallel.tensor=2", f"checkpoint.interval={SAVED}", "checkpoint.keep_last=2"]


def test_tp2_checkpoint_resumes_with_sequence_parallel(tmp_path):
    corpus = write_corpus(tmp_path / "data" / "train")
    reference = tmp_path / "reference"
    torchrun(2, train_args(corpus, reference, *TP2, steps=STEPS))
    assert list_tags(reference / "checkpoints") == [f"step_{SAVED:08d}", f"step_{STEPS:08d}"]

    # what a kill after the step-5 save leaves, relaunched with sequence parallelism on
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")
    set_latest(run / "checkpoints", f"step_{SAVED:08d}")
    assert latest_tag(run / "checkpoints") == f"step_{SAVED:08d}"
    (run / "metrics.jsonl").unlink()  # appended to: every row read afterwards is the relaunch's
    out = torchrun(2, train_args(corpus, run, *TP2, "parallel.sequence_parallel=true", steps=STEPS))
    text = out.stdout + out.stderr
    assert f"resumed from step {SAVED}" in text
    assert f"parallel.sequence_parallel: false → true from step {SAVED + 1}" in text, text[-4000:]  # honoured

    expected = {r["step"]: r for r in metrics(reference)}
    resumed = metrics(run)
    assert [r["step"] for r in resumed] == list(range(SAVED + 1, STEPS + 1)), resumed
    worst = assert_close_rel(
        [r["loss"] for r in resumed], [expected[r["step"]]["loss"] for r in resumed], 1e-5
    )
    print(
        f"TP2 -> TP2+SP at step {SAVED}: steps {SAVED + 1}-{STEPS} max relative loss difference {worst:.1e}"
    )
    assert [r["consumed_samples"] for r in resumed] == [
        expected[r["step"]]["consumed_samples"] for r in resumed
    ]
