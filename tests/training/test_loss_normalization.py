"""Pretraining: the loss of a step is the mean over every trained token of the global batch, whatever the
micro-batch size, accumulation, data or pipeline parallelism (issue 12 §3, "check pretraining").

Fixed windows train every token unless ``loss_mask`` says otherwise; here every other document ends in
a run of pad tokens, which megatron-core's GPTDataset masks, so samples train 0 to 32 tokens. Per-step
training losses (10 steps) and the token-weighted validation loss must equal the whole-batch run's
(one micro-batch of 8) within 1e-5 relative; the wrong-on-purpose control (the old per-micro-batch
mean at mbs=1 x accumulation 8) must be told apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.helpers import assert_close_rel, curve, losses, single, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow
CONTROL = "tests.training.per_micro_batch_mean"  # bigtrain.pretrain with the old normalization
REL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("padded_corpus") / "patterns", pad_runs=True)


def args(corpus: Path, run_dir: Path, *overrides: str) -> list[str]:
    """tiny.yaml, global batch 8, validation over 2 global batches of the same corpus after step 10."""
    return train_args(corpus, run_dir, "checkpoint.save=false", "train.micro_batch_size=8",
                      f"data.valid={corpus}", "train.eval_steps=2", *overrides)  # fmt: skip


def test_pad_masks_do_not_depend_on_which_sample_is_read_first(corpus, tmp_path):
    """The premise of the data-parallel comparison: a rank that first reads a sample with pad tokens
    masks the same tokens of every later sample as one that did not (megatron-core 0.16 zeroed the
    first sample's pad positions in its cached mask, so they stuck to every later sample)."""
    from bigtrain.config import load_config
    from bigtrain.data import build_datasets
    from tests.training.helpers import TINY

    cfg = load_config(TINY, args(corpus, tmp_path)[3:]).resolve(1)
    masks = {}
    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [4, 0, 1, 2, 3, 5, 6, 7], [5, 0, 1, 2, 3, 4, 6, 7]):
        train, _ = build_datasets(cfg)
        read = {i: train[i]["loss_mask"] for i in order}  # in this order: the first read is cached
        masks[order[0]] = [read[i] for i in range(8)]
    counts = [float(m.sum()) for m in masks[0]]
    assert min(counts) < 32 and max(counts) == 32, counts  # trained tokens differ between samples
    for first in (4, 5):
        assert all(torch.equal(a, b) for a, b in zip(masks[first], masks[0])), f"read {first} first"


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("padded_reference")
    single(args(corpus, run_dir))
    assert len(losses(run_dir)) == 10
    return run_dir


LAYOUTS = {  # name -> (processes, overrides)
    "mbs1-accum8": (1, ["train.micro_batch_size=1"]),
    "dp2-zero2-mbs1-accum4": (2, ["train.micro_batch_size=1", "zero.stage=2"]),
    "pp2-mbs2": (2, ["train.micro_batch_size=2", "parallel.pipeline=2"]),  # 4 pipeline micro-batches
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_pretraining_loss_does_not_depend_on_the_split(name, corpus, reference, tmp_path):
    nproc, overrides = LAYOUTS[name]
    run_args = args(corpus, tmp_path, *overrides)
    single(run_args) if nproc == 1 else torchrun(nproc, run_args)
    worst = assert_close_rel(curve(tmp_path), curve(reference), REL)
    print(f"{name}: {curve(tmp_path)} vs mbs=8 {curve(reference)}: worst relative difference {worst:.1e}")


def test_per_micro_batch_mean_is_told_apart(corpus, reference, tmp_path):
    """Control: the old normalization counts a micro-batch of pad tokens (loss 0) like a full one."""
    single(["bigtrain.pretrain", *args(corpus, tmp_path, "train.micro_batch_size=1")], module=CONTROL)
    old, right = losses(tmp_path), losses(reference)
    gaps = [abs(a - b) / b for a, b in zip(old, right)]
    print(f"per-micro-batch means {old} vs global token mean {right}: relative gaps {gaps}")
    assert max(gaps) > 1e-2
