"""bigtrain.evaluate (the decoder's windows) at another layout than the one a checkpoint was trained at."""

from __future__ import annotations

import json

import pytest

from tests.training.helpers import single, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow


def test_evaluate_at_context_2_equals_one_process(tmp_path):
    """The mean loss over every window at ``parallel.context=2`` (each rank half of each window) equals
    one process's within 1e-6 relative: it was twice the mean (each rank's chunk mean, summed over the
    context ranks)."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns", documents=120)
    run = tmp_path / "run"
    single(train_args(corpus, run, steps=2))
    args = ["--config", str(run / "config.yaml"), "--data", str(corpus), "--set", f"train.run_dir={run}"]
    one = json.loads(
        single([*args, "parallel.context=1"], module="bigtrain.evaluate").stdout.splitlines()[-1]
    )
    two = json.loads(
        torchrun(2, [*args, "parallel.context=2"], module="bigtrain.evaluate").stdout.splitlines()[-1]
    )
    assert one["windows"] == two["windows"] > 10
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6), (one, two)
