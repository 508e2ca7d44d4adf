"""Megatron sequence parallelism (issue 18, first part): TP2 with ``parallel.sequence_parallel`` trains the
single-process model, per step within 1e-5 relative over 10 steps, also with full activation
recomputation; without the compat patch that makes megatron-core's sequence-parallel buffers
device-correct, the run fails on CPU."""

from __future__ import annotations

import pytest

from tests.training.helpers import assert_close_rel, losses, single, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow

SP = ["checkpoint.save=false", "parallel.tensor=2", "parallel.sequence_parallel=true"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "patterns")


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("baseline")
    single(train_args(corpus, run, "checkpoint.save=false"))
    return losses(run)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_sequence_parallel_matches_single_process(recompute, corpus, baseline, tmp_path):
    torchrun(2, train_args(corpus, tmp_path, *SP, f"activation_checkpointing={recompute}"))
    assert_close_rel(losses(tmp_path), baseline, 1e-5)


def test_without_device_correct_buffers_it_fails_on_cpu(corpus, tmp_path):
    out = torchrun(
        2,
        ["--without-patch=megatron_buffers_on", "bigtrain.pretrain", *train_args(corpus, tmp_path, *SP)],
        module="tests.entry_point",
        check=False,
    )
    assert out.returncode != 0 and "step 1/" not in out.stdout
    assert "Torch not compiled with CUDA enabled" in out.stderr  # megatron's torch.cuda.current_device()
