"""`kill -9` of one rank at step 7 (checkpoints every 5), then the same command again: the job resumes
from step 5 and steps 6-20 equal the uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from bigtrain.checkpoint import latest_tag, list_tags
from bigtrain.config import load_config
from bigtrain.engine import LRSchedule
from tests.training.helpers import (
    TINY,
    assert_close_rel,
    assert_refused_before_start_up,
    metrics,
    single,
    torchrun,
    train_args,
    write_corpus,
)

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


# ---------------------------------------------------------------------------- relaunch vs the saved config
CONSTANT_LR = ["optim.decay=constant", "optim.warmup_steps=0"]  # steps 1-4 do not depend on train.steps


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """The issue's run: 12 documents, train.steps=4 (data.train_samples unset), checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("relaunch")
    corpus = write_corpus(root / "corpus" / "docs", documents=12)
    run = root / "run"
    single(train_args(corpus, run, *CONSTANT_LR, "checkpoint.interval=2", steps=4))
    return corpus, run


def copy_run(run: Path, dest: Path, keep_step: int) -> Path:
    """A copy of ``run`` whose newest checkpoint is ``keep_step`` (later ones removed)."""
    shutil.copytree(run, dest)
    for tag in list_tags(dest / "checkpoints"):
        if int(tag[5:]) > keep_step:
            shutil.rmtree(dest / "checkpoints" / tag)
    return dest


def meta(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:08d}" / "bigtrain.json").read_text())


def test_more_steps_than_the_saved_data_order_is_refused(four_steps, tmp_path):
    """4 -> 8 steps would rebuild megatron's shuffle for 64 samples (batches 5-8 re-reading seen windows):
    refused in pre-flight naming train.steps, the saved sample count and the remedies."""
    corpus, run = four_steps
    copy = copy_run(run, tmp_path / "run", 4)
    out = single(train_args(corpus, copy, *CONSTANT_LR, steps=8), check=False, no_start_up=True)
    assert_refused_before_start_up(out)  # pre-flight: no process group, no model
    line = next(x for x in out.stderr.splitlines() if x.startswith("bigtrain: config error"))
    assert "train.steps: checkpoint 4 vs config 8 needs 64 training samples" in line
    assert "built for 32" in line and "data.train_samples=64" in line and "checkpoint.load=" in line
    assert latest_tag(copy / "checkpoints") == "step_00000004"  # nothing was touched

    # wrong on purpose: what the relaunch used to read. A shuffle built for 64 samples differs from the
    # saved run's (built for 32) already in its first 32, so batches 5-8 would not continue the epoch;
    # the refusal names the first sample that differs.
    saved, rebuilt = (train_dataset(corpus, steps) for steps in (4, 8))
    first = next(i for i in range(32) if window(saved, i) != window(rebuilt, i))
    assert f"differs from it at sample {first} " in line


def test_more_steps_in_the_same_data_order_are_honoured(tmp_path):
    """400 documents (886 windows an epoch): 4 -> 8 steps needs 64 samples, and megatron's order built for
    64 starts with the saved run's 32 (pre-flight builds and compares both). Honoured from step 5 in one
    line, recorded in config.yaml and the new checkpoint, and steps 5-8 equal an uninterrupted 8-step run."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    run, reference = tmp_path / "run", tmp_path / "reference"
    single(train_args(corpus, run, *CONSTANT_LR, steps=4))
    out = single(train_args(corpus, run, *CONSTANT_LR, steps=8))
    assert "resumed from step 4" in out.stdout
    assert (
        "train.steps: 4 → 8 from step 5 (data order of the saved run kept: its first 32 samples are "
        "unchanged; data.train_samples 32 → 64)" in out.stdout
    )
    single(train_args(corpus, reference, *CONSTANT_LR, steps=8))
    resumed, uninterrupted = metrics(run)[4:], metrics(reference)[4:]
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [5, 6, 7, 8]
    assert [r["consumed_samples"] for r in resumed] == [r["consumed_samples"] for r in uninterrupted]
    worst = assert_close_rel([r["loss"] for r in resumed], [r["loss"] for r in uninterrupted], 1e-6)
    print(f"steps 5-8 relaunched 4 -> 8 vs uninterrupted: max relative loss difference {worst:.1e}")
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["train_samples"] == 64
    assert meta(run, 8)["config"]["data"]["train_samples"] == 64
    assert meta(run, 8)["config"]["train"]["steps"] == 8


def train_dataset(corpus: Path, steps: int):
    from bigtrain.data import build_datasets

    args = train_args(corpus, Path("unused"), *CONSTANT_LR, steps=steps)
    return build_datasets(load_config(TINY, args[3:]).resolve(1))[0]


def window(dataset, i: int) -> list[int]:
    return dataset[i]["tokens"].tolist()


def test_fewer_steps_keep_the_saved_data_order(four_steps, tmp_path):
    """Relaunched from step 2 with train.steps 4 -> 3: the datasets stay built for the saved 32 samples
    (recorded in config.yaml and the new checkpoint), so step 3 equals the saved run's step 3. Before,
    the shuffle was rebuilt for 24 samples (the control below shows that order differs)."""
    corpus, run = four_steps
    copy = copy_run(run, tmp_path / "run", 2)
    out = single(train_args(corpus, copy, *CONSTANT_LR, steps=3))
    assert "resumed from step 2" in out.stdout
    assert "train.steps: 4 → 3 from step 3" in out.stdout
    assert "data.train_samples: kept at 32, the saved run's data order" in out.stdout
    resumed, reference = metrics(copy)[-1], metrics(run)[2]
    assert resumed["step"] == reference["step"] == 3
    assert abs(resumed["loss"] - reference["loss"]) <= 1e-6 * reference["loss"], (resumed, reference)
    assert yaml.safe_load((copy / "config.yaml").read_text())["data"]["train_samples"] == 32
    assert meta(copy, 3)["config"]["data"]["train_samples"] == 32
    assert meta(copy, 3)["config"]["train"]["steps"] == 3

    saved, rebuilt = train_dataset(corpus, 4), train_dataset(corpus, 3)  # control: the old relaunch
    assert [window(saved, i) for i in range(16, 24)] != [window(rebuilt, i) for i in range(16, 24)]


def test_other_data_under_the_saved_prefix_is_refused(tmp_path):
    """The user's trial: 2 steps on data/w (133 documents), then 60 other documents written to the same
    prefix and a relaunch with train.steps=3. It exited 0 saying the saved data order was kept (it was
    rebuilt from the new files); now pre-flight compares the files with those bigtrain.json records and
    refuses, naming the prefix and the remedies."""
    prefix = write_corpus(tmp_path / "data" / "w", documents=133)
    run = tmp_path / "run"
    single(train_args(prefix, run, steps=2))
    recorded = meta(run, 2)["data"]["data.train"][0]["shards"]
    assert [p for p, _ in recorded] == [str(prefix)] and recorded[0][1]["bin_size"] > 0
    write_corpus(prefix, documents=60, seed=1)
    out = single(train_args(prefix, run, steps=3), check=False, no_start_up=True)
    assert_refused_before_start_up(
        out,
        f"data.train: {prefix} is not the data the checkpoint was trained on (.bin bytes ",
        "restore the files the checkpoint was trained on",
        "checkpoint.load=",
    )
    assert "data order of the saved run kept" not in out.stdout + out.stderr
    assert latest_tag(run / "checkpoints") == "step_00000002"


def test_data_parallel_size_and_honoured_changes_at_zero1(tmp_path):
    """ZeRO-1 on 2 ranks. Relaunched on 1 process or at another ZeRO stage: pre-flight says the optimizer
    state will be resharded (not run here). Relaunched on 2 ranks with a new LR schedule,
    Adam betas/eps, weight decay and clip: each said in one line, and each is what the optimizer holds
    (DeepSpeed's load had put the saved values back) and what the new checkpoint records."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    run = tmp_path / "run"
    common = ["zero.stage=1", "data.train_samples=64", "optim.warmup_steps=0"]
    torchrun(2, train_args(corpus, run, *common, steps=2))

    # another data-parallel size or ZeRO stage: resharded (tests/training/test_reshard_resume.py), said first
    out = single(train_args(corpus, run, *common, steps=4), check=False, no_start_up=True)
    assert "saved at TP1 PP1 DP2 ZeRO-1 into TP1 PP1 DP1 ZeRO-1 (resharding optimizer state)" in out.stdout
    out = torchrun(
        2, train_args(corpus, run, *common, "zero.stage=2", steps=4), check=False, no_start_up=True
    )
    assert "saved at TP1 PP1 DP2 ZeRO-1 into TP1 PP1 DP2 ZeRO-2 (resharding optimizer state)" in out.stdout

    changed = ["optim.lr=0.02", "optim.min_lr=0.002", "optim.decay=linear", "optim.beta2=0.99",
               "optim.eps=1e-6", "optim.weight_decay=0.05", "optim.grad_clip=0.25"]  # fmt: skip
    out = torchrun(2, train_args(corpus, run, *common, *changed, steps=4))
    for line in ("optim.lr: 0.01 → 0.02", "optim.min_lr: 0.001 → 0.002", "optim.decay: cosine → linear",
                 "optim.beta2: 0.95 → 0.99", "optim.eps: 1e-08 → 1e-06", "optim.weight_decay: 0.1 → 0.05",
                 "optim.grad_clip: 1.0 → 0.25", "train.steps: 2 → 4"):  # fmt: skip
        assert f"{line} from step 3" in out.stdout, line
    new = load_config(TINY, train_args(corpus, run, *common, *changed, steps=4)[3:]).resolve(2)
    resumed = [r for r in metrics(run) if r["step"] > 2]
    assert [r["lr"] for r in resumed] == pytest.approx([LRSchedule(new).lr_at(s) for s in (2, 3)], rel=1e-12)
    ckpt = run / "checkpoints" / "step_00000004"
    for rank in (0, 1):
        state = torch.load(next(ckpt.glob(f"zero_pp_rank_{rank}_*optim_states.pt")), weights_only=False)
        zero = state["optimizer_state_dict"]
        assert zero["clip_grad"] == 0.25
        groups = zero["base_optimizer_state"]["param_groups"]
        assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # matrices, then norms
        assert all(tuple(g["betas"]) == (0.9, 0.99) and g["eps"] == 1e-6 for g in groups)
    saved = meta(run, 4)["config"]["optim"]
    assert (saved["lr"], saved["beta2"], saved["grad_clip"]) == (0.02, 0.99, 0.25)


def test_data_parallel_size_change_of_whole_optimizer_state_is_honoured(tmp_path):
    """ZeRO-0 fp32 keeps the whole optimizer state on every rank and the data position is a global
    sample count: 2 ranks -> 1 process is honoured (said in one line) and continues the curve of an
    uninterrupted single-process run exactly."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    common = ["data.train_samples=32", *CONSTANT_LR]
    reference, run = tmp_path / "reference", tmp_path / "run"
    single(train_args(corpus, reference, *common, steps=4))
    torchrun(2, train_args(corpus, run, *common, steps=2))
    out = single(train_args(corpus, run, *common, steps=4))
    assert "derived.data_parallel_size: 2 → 1 from step 3" in out.stdout
    assert_close_rel([r["loss"] for r in metrics(run)], [r["loss"] for r in metrics(reference)], 1e-6)
    assert meta(run, 4)["layout"] == {
        "tensor": 1,
        "pipeline": 1,
        "data_parallel": 1,
        "context": 1,
        "expert": 1,
    }
