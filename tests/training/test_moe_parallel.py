"""Issue 19, expert parallelism end to end through ``bigtrain.pretrain`` (configs/moe-tiny.yaml, fp32,
gloo): per-step losses over 10 steps at EP2 (DP2; ZeRO-0 and 1), EP2 x TP2 with sequence parallelism,
EP2 x EDP2 at ZeRO-2 (world 4: expert optimizer state sharded over the expert-data-parallel group), PP2
and DP2 ZeRO-2 equal the single-process run within 1e-5 relative, with gradient accumulation everywhere
(micro batch 1, global 8); a control whose expert ranks hold each other's experts breaks the bound. A
run killed at step 7 resumes exactly (1e-6) at EP2 from step 5 (ZeRO-0 and 1); a resume at another
expert-parallel size is refused; the weights files hold every expert. The aux loss reaches training
(coefficient 0 vs 0.01 differ).

One launch per layout, shared by the assertions that read it."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file

from bigtrain.checkpoint import latest_tag
from tests.conftest import REPO, run_cmd
from tests.training.helpers import MOE_TINY, assert_close_rel, losses, metrics, single, torchrun, write_corpus
from tests.training.helpers import train_args as tiny_args

pytestmark = pytest.mark.slow

MICRO = ["train.micro_batch_size=1"]  # global 8: 8 micro-batches per step at DP1, 4 at DP2, 2 at DP4
SAVE = ["checkpoint.interval=5", "checkpoint.keep_last=2"]
TOLERANCE = 1e-5


def train_args(corpus, run, *overrides: str) -> list[str]:
    return tiny_args(corpus, run, *MICRO, *overrides, config=MOE_TINY)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "patterns")


@pytest.fixture(scope="module")
def baseline_run(corpus, tmp_path_factory):
    """The single-process run (saving at steps 5 and 10)."""
    run = tmp_path_factory.mktemp("baseline")
    single(train_args(corpus, run, *SAVE))
    values = losses(run)
    assert len(values) == 10
    assert min(values[1:]) < values[0] - 0.15, f"training must move the loss: {values}"
    return run


@pytest.fixture(scope="module")
def baseline(baseline_run):
    return losses(baseline_run)


@pytest.fixture(scope="module")
def ep2_runs(corpus, tmp_path_factory):
    """ZeRO stage -> an EP2 x DP2 run saving at steps 5 and 10 (run on first use). ZeRO-0: the engine's
    own expert gradient reduction, the optimizer state per expert rank; ZeRO-1: expert optimizer groups
    (over an expert-data-parallel group of one)."""
    runs = {}

    def get(zero: int):
        if zero not in runs:
            runs[zero] = tmp_path_factory.mktemp(f"ep2-zero{zero}")
            torchrun(2, train_args(corpus, runs[zero], "parallel.expert=2", f"zero.stage={zero}", *SAVE))
        return runs[zero]

    return get


@pytest.fixture(scope="module")
def ep2_run(ep2_runs):
    return ep2_runs(0)


NO_SAVE = "checkpoint.save=false"
LAYOUTS = {
    "ep2-tp2-sp": (4, ["parallel.expert=2", "parallel.tensor=2", "parallel.sequence_parallel=true", NO_SAVE]),
    # saves at step 10: the experts' fp32 masters come from ZeRO-2 shards of the expert-data-parallel group
    "ep2-edp2-zero2": (4, ["parallel.expert=2", "zero.stage=2", "checkpoint.interval=10"]),
    "pp2": (2, ["parallel.pipeline=2", NO_SAVE]),
    "dp2-zero2": (2, ["zero.stage=2", NO_SAVE]),
}


def weights_at_step_10(run) -> dict:
    tag = latest_tag(run / "checkpoints")
    assert tag == "step_00000010"
    return load_file(run / "checkpoints" / tag / "weights" / "tp00_pp00.safetensors")


def assert_same_weights(run, baseline_run) -> float:
    """``run``'s weights file at step 10 is the single process's: every expert, the same values up to
    Adam's amplification of fp32 noise (measured: experts 1.1e-5, rarely seen embedding rows 1.0e-4; a
    wrong rank's experts would differ by their init, ~2e-2). Returns the largest expert difference."""
    got, want = weights_at_step_10(run), weights_at_step_10(baseline_run)
    assert got.keys() == want.keys()
    experts = [k for k in want if "experts" in k]
    assert experts and all(got[k].shape == want[k].shape for k in want), {k: got[k].shape for k in experts}
    diff = {k: float((got[k] - want[k]).abs().max()) for k in want}
    assert max(diff.values()) < 1e-3, diff
    worst = max(diff[k] for k in experts)
    assert worst < 1e-4, diff
    return worst


@pytest.mark.parametrize("zero", [0, 1])
def test_expert_parallel_matches_single_process(zero, ep2_runs, baseline_run, baseline):
    """Losses, and the gradient norm (clipping's input), which sums every expert rank's experts."""
    run = ep2_runs(zero)
    worst = assert_close_rel(losses(run), baseline, TOLERANCE)
    print(f"ep2 zero{zero}: max relative loss difference {worst:.1e}")
    norms = [[r["grad_norm"] for r in metrics(r)] for r in (run, baseline_run)]
    print(f"ep2 zero{zero}: max relative grad-norm difference {assert_close_rel(*norms, TOLERANCE):.1e}")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_single_process(name, corpus, baseline, baseline_run, tmp_path):
    nproc, overrides = LAYOUTS[name]
    torchrun(nproc, train_args(corpus, tmp_path, *overrides), timeout=600)
    worst = assert_close_rel(losses(tmp_path), baseline, TOLERANCE)
    print(f"{name}: max relative loss difference {worst:.1e}")
    if NO_SAVE not in overrides:
        print(
            f"{name}: expert weights at step 10, max abs difference {assert_same_weights(tmp_path, baseline_run):.1e}"
        )


def test_tokens_at_the_wrong_experts_break_the_bound(corpus, baseline, tmp_path):
    """Control: expert rank r holds rank r+1's experts (every token computed by another expert)."""
    torchrun(
        2,
        train_args(corpus, tmp_path, NO_SAVE, "parallel.expert=2", "debug.rotate_expert_ranks=true"),
    )
    wrong = losses(tmp_path)
    worst = max(abs(a - b) / abs(b) for a, b in zip(wrong, baseline))
    print(f"rotated experts: max relative loss difference {worst:.1e}")
    assert worst > TOLERANCE, (wrong, baseline)


def test_weights_files_hold_every_expert(ep2_run, baseline_run):
    """EP2's weights file is the single process's: all 4 experts stacked, the same values."""
    worst = assert_same_weights(ep2_run, baseline_run)
    print(f"ep2 vs single-process expert weights at step 10: max abs difference {worst:.1e}")
    meta = json.loads((ep2_run / "checkpoints" / "step_00000010" / "bigtrain.json").read_text())
    assert meta["layout"]["expert"] == 2


@pytest.mark.parametrize("zero", [0, 1])
def test_kill9_at_ep2_then_relaunch_continues_the_same_curve(zero, corpus, ep2_runs, tmp_path):
    """Expert rank 1 is killed after step 7; the relaunch resumes from step 5 with its own experts and
    their optimizer state (ZeRO-0: DeepSpeed's per-expert-rank optimizer file, experts from the weights
    files; ZeRO-1: the rank's shards) and steps 6-10 equal the uninterrupted run's."""
    layout = ["parallel.expert=2", f"zero.stage={zero}", *SAVE]
    kill = ["debug.crash_at_step=7", "debug.fault_rank=1"]
    crashed = torchrun(2, train_args(corpus, tmp_path, *layout, *kill), check=False)
    assert crashed.returncode != 0
    assert latest_tag(tmp_path / "checkpoints") == "step_00000005"
    out = torchrun(2, train_args(corpus, tmp_path, *layout))
    assert "resumed from step 5" in out.stdout
    uninterrupted = {r["step"]: r["loss"] for r in metrics(ep2_runs(zero))}
    resumed = [r for r in metrics(tmp_path) if r["step"] > 5][-5:]
    assert [r["step"] for r in resumed] == list(range(6, 11))
    worst = assert_close_rel([r["loss"] for r in resumed], [uninterrupted[r["step"]] for r in resumed], 1e-6)
    print(f"ep2 zero{zero} resumed at step 5: max relative loss difference {worst:.1e}")


def test_an_ep2_checkpoint_generates_in_one_process_and_is_not_resharded(ep2_run, tmp_path):
    """tools/generate.py reads an EP2 checkpoint in one process (every expert is in the weight files);
    tools/reshard_checkpoint.py refuses its expert-parallel optimizer state with a line naming it."""
    ckpt = str(ep2_run / "checkpoints")
    gen = run_cmd([sys.executable, str(REPO / "tools" / "generate.py"), "--checkpoint", ckpt, "--prompt-ids", "5,6,7",
                   "--max-new-tokens", "4", "--greedy"], timeout=300)  # fmt: skip
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-2000:]
    out = run_cmd([sys.executable, str(REPO / "tools" / "reshard_checkpoint.py"), ckpt, "--tensor", "1",
                   "--pipeline", "2", "--out", str(tmp_path / "out")], timeout=300, check=False)  # fmt: skip
    assert out.returncode != 0 and "saved at parallel.expert 2" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_resume_at_another_expert_parallel_size_is_refused(corpus, ep2_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ep2_run, run)
    out = single(train_args(corpus, run, *SAVE, "train.steps=12"), check=False)
    assert out.returncode != 0
    assert "parallel.expert: checkpoint 2 vs config 1" in out.stderr + out.stdout, out.stderr[-2000:]


def test_aux_loss_reaches_training(corpus, baseline, tmp_path):
    """The load-balancing loss changes the updates: coefficient 0 gives another curve than 0.01."""
    single(train_args(corpus, tmp_path, NO_SAVE, "model.moe.aux_loss_coeff=0"))
    without = losses(tmp_path)
    worst = max(abs(a - b) / abs(b) for a, b in zip(without, baseline))
    print(f"aux_loss_coeff 0 vs 0.01: max relative loss difference {worst:.1e}")
    assert worst > TOLERANCE and without[0] == pytest.approx(baseline[0], rel=1e-6)
