"""Issue 18, context parallelism end to end through ``bigtrain.pretrain``: per-step losses over 10 steps
at ``parallel.context=2`` (alone with ZeRO-1, with tensor parallel 2, and with tensor parallel 2 plus
sequence parallelism; 2 or 4 gloo processes) equal the single-process run within 1e-5 relative; a
checkpoint saved at context 2 resumes exactly at context 2 and, resharded, at context 1.

The gradient-level checks (every parameter after one step, the rotary-offset control, a rank whose
tokens are all masked) are in tests/models/test_context.py; packed SFT at context 2 in
tests/finetune/test_parallel.py."""

from __future__ import annotations

import shutil

import pytest

from bigtrain.checkpoint import latest_tag
from bigtrain.checkpoint_files import set_latest
from tests.training.helpers import (
    assert_close_rel,
    losses,
    metrics,
    single,
    torchrun,
    train_args,
    write_corpus,
)

pytestmark = pytest.mark.slow

SAVE = ["checkpoint.interval=5", "checkpoint.keep_last=2"]
MHA = ["model.num_kv_heads=4"]  # tensor 2 x context 2 needs 2 key/value heads per tensor rank


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "patterns")


@pytest.fixture(scope="module")
def baselines(corpus, tmp_path_factory):
    """kv heads override -> the single-process run's 10 losses (run on first use)."""
    runs: dict[tuple[str, ...], list[float]] = {}

    def get(*model: str) -> list[float]:
        if model not in runs:
            run = tmp_path_factory.mktemp("baseline")
            single(train_args(corpus, run, "checkpoint.save=false", *model))
            runs[model] = losses(run)
            assert len(runs[model]) == 10
            assert min(runs[model][1:]) < runs[model][0] - 0.15, f"training must move the loss: {runs[model]}"
        return runs[model]

    return get


@pytest.fixture(scope="module")
def cp2_run(corpus, tmp_path_factory):
    """Context 2 at ZeRO-1 (its optimizer state partitioned over the data x context ranks), saving at
    steps 5 and 10."""
    run = tmp_path_factory.mktemp("cp2")
    torchrun(2, train_args(corpus, run, "parallel.context=2", "zero.stage=1", *SAVE))
    return run


def test_context_2_matches_single_process(cp2_run, baselines):
    worst = assert_close_rel(losses(cp2_run), baselines(), 1e-5)
    print(f"CP2 ZeRO-1: max relative loss difference {worst:.1e}")


LAYOUTS = {
    # 4 processes: data parallel 2 x context 2, ZeRO-1 over the 4 data x context ranks
    "cp2-dp2-zero1": (4, ["parallel.context=2", "zero.stage=1"], ()),
    "tp2-cp2": (4, ["parallel.context=2", "parallel.tensor=2"], tuple(MHA)),
    # sequence parallel inside each context chunk: norms hold 32 / (2 x 2) positions
    "tp2-sp-cp2-recompute": (
        4,
        [
            "parallel.context=2",
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "activation_checkpointing=full",
        ],
        tuple(MHA),
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_context_layouts_match_single_process(name, corpus, baselines, tmp_path):
    nproc, overrides, model = LAYOUTS[name]
    torchrun(nproc, train_args(corpus, tmp_path, "checkpoint.save=false", *overrides, *model))
    worst = assert_close_rel(losses(tmp_path), baselines(*model), 1e-5)
    print(f"{name}: max relative loss difference {worst:.1e}")


def _cut_at_step_5(run, dest):
    """A copy of ``run`` as a kill right after its step-5 save leaves it."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step_00000010")
    set_latest(dest / "checkpoints", "step_00000005")
    assert latest_tag(dest / "checkpoints") == "step_00000005"
    (dest / "metrics.jsonl").unlink()  # appended to: the rows read are the relaunch's
    return dest


@pytest.mark.parametrize("nproc", [2, 1], ids=["at-context-2", "resharded-to-context-1"])
def test_resume_from_context_2(nproc, corpus, cp2_run, tmp_path):
    """Steps 6-10 after a kill at step 5 equal the uninterrupted context-2 run's, relaunched at context
    2 (DeepSpeed's own load) or at one process (ZeRO-1's state partitioned over the 2 data x context
    ranks, resharded)."""
    run = _cut_at_step_5(cp2_run, tmp_path / "run")
    context = ["parallel.context=2"] if nproc == 2 else []
    args = train_args(corpus, run, "zero.stage=1", *SAVE, *context)
    proc = torchrun(2, args) if nproc == 2 else single(args)
    if nproc == 1:
        line = "resuming step_00000005 saved at TP1 PP1 DP1 CP2 ZeRO-1 into TP1 PP1 DP1 ZeRO-1"
        assert line in proc.stdout + proc.stderr
    resumed = metrics(run)
    assert [r["step"] for r in resumed] == list(range(6, 11))
    expected = {r["step"]: r for r in metrics(cp2_run)}
    worst = assert_close_rel(
        [r["loss"] for r in resumed], [expected[r["step"]]["loss"] for r in resumed], 1e-5
    )
    print(f"resume at {nproc} process(es): steps 6-10 max relative loss difference {worst:.1e}")
    assert [r["consumed_samples"] for r in resumed] == [
        expected[r["step"]]["consumed_samples"] for r in resumed
    ]
