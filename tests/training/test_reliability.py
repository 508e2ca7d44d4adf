"""Faults for real, on gloo CPU processes: kills inside a save, corrupted and truncated checkpoints,
SIGTERM to the launcher, injected non-finite losses, a hung rank, a loss spike with rollback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bigtrain import checkpoint_files as files
from tests.conftest import REPO, cpu_env, free_port, needs_precision
from tests.training.helpers import metrics, single, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "patterns")


def ckpts(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def resumed_step(stdout: str) -> int | None:
    for line in stdout.splitlines():
        if line.startswith("resumed from step "):
            return int(line.split()[3])
    return None


def assert_latest_is_complete(run_dir: Path) -> None:
    tag = files.latest_pointer(ckpts(run_dir))
    if tag is not None:
        assert files.verify(ckpts(run_dir) / tag) == [], f"latest names an incomplete checkpoint {tag}"


def weights(run_dir: Path, step: int) -> dict:
    """Every saved master tensor of a checkpoint, keyed by shard file and layout key."""
    shards = sorted((ckpts(run_dir) / files.tag_for(step) / "weights").glob("*.safetensors"))
    return {(f.name, k): v for f in shards for k, v in load_file(str(f)).items()}


# ---------------------------------------------------------------------------- 2. kill inside a save
def test_kill_at_every_moment_of_a_save_then_relaunch(corpus, tmp_path):
    """Ten launches, each SIGKILLed at another point of the save of its first new step; every relaunch
    resumes from the last complete checkpoint and ``latest`` never names an incomplete one."""
    run = tmp_path / "run"
    args = train_args(corpus, run, "checkpoint.interval=1", "checkpoint.keep_last=3", steps=40)
    done = 0  # the newest complete checkpoint's step
    leftover = False  # an interrupted save left its temporary directory behind
    for point in files.SAVE_FAULT_POINTS:
        out = single(
            [*args, f"debug.kill_in_save={point}", f"debug.kill_in_save_step={done + 1}"], check=False
        )
        assert out.returncode == -signal.SIGKILL, (point, out.returncode, out.stderr[-2000:])
        assert resumed_step(out.stdout) == (done or None), (point, out.stdout[-2000:])
        assert ("removed leftovers of interrupted saves" in out.stdout) == leftover, point
        assert f"debug.kill_in_save: SIGKILL at {point!r}" in out.stdout
        assert_latest_is_complete(run)
        committed = files.SAVE_FAULT_POINTS.index(point) >= files.COMMITTED_AT
        done += committed  # renamed into place before the kill: complete
        leftover = any(p.name.startswith(files.TMP_PREFIX) for p in ckpts(run).iterdir())
        assert leftover == (not committed), point
        assert files.newest_valid(ckpts(run)) == (files.tag_for(done) if done else None), point
    out = single([*args, "train.steps=12"])
    assert resumed_step(out.stdout) == done == len(files.SAVE_FAULT_POINTS) - files.COMMITTED_AT
    assert files.candidate_tags(ckpts(run))[0] == files.tag_for(12)


# ---------------------------------------------------------------------------- 3. corruption
def test_corrupted_then_truncated_newest_checkpoint_falls_back(corpus, tmp_path):
    run = tmp_path / "run"
    args = train_args(corpus, run, "checkpoint.interval=2", "checkpoint.keep_last=3", "zero.stage=1", steps=4)
    first = torchrun(2, args)
    newest = ckpts(run) / files.tag_for(4)
    # each ZeRO-1 shard holds half of (fp32 master + Adam moments) = 1.5x the weights, not the whole
    # flat master buffer (2x): shared masters are compacted before saving
    weights_bytes = (newest / "weights" / "tp00_pp00.safetensors").stat().st_size
    for shard in newest.glob("*optim_states.pt"):
        assert shard.stat().st_size < 1.75 * weights_bytes, (shard.name, shard.stat().st_size, weights_bytes)
    shard = newest / "weights" / "tp00_pp00.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))

    second = torchrun(2, args)
    assert f"{shard} fails its sha256 checksum" in second.stderr
    assert resumed_step(second.stdout) == 2
    assert (ckpts(run) / f"{files.tag_for(4)}{files.INVALID_SUFFIX}").is_dir()

    optim = sorted(newest.glob("*optim_states.pt"))  # one ZeRO-1 optimizer shard per data-parallel rank
    assert len(optim) == 2
    with open(optim[1], "r+b") as f:
        f.truncate(optim[1].stat().st_size // 2)
    third = torchrun(2, args)
    assert f"{optim[1]} has" in third.stderr and "truncated" in third.stderr
    assert resumed_step(third.stdout) == 2
    # each relaunch replayed steps 3-4 exactly
    rows = metrics(run)
    by_pass = [[r["loss"] for r in rows if r["step"] == s] for s in (3, 4)]
    for losses in by_pass:
        assert len(losses) == 3 and max(losses) - min(losses) <= 1e-6 * abs(losses[0]), losses
    assert "resumed" not in first.stdout

    # every checkpoint bad: refused (exit 2), not silently started over from step 0
    for tag in files.candidate_tags(ckpts(run)):
        with open(ckpts(run) / tag / "weights" / "tp00_pp00.safetensors", "r+b") as f:
            f.truncate(8)
    fourth = torchrun(2, args, check=False)
    assert fourth.returncode != 0 and "step 1/" not in fourth.stdout
    assert (
        "no valid checkpoint left" in fourth.stderr
        and "not starting the run over from step 0" in fourth.stderr
    )


# ---------------------------------------------------------------------------- 4. SIGTERM
def test_sigterm_to_launcher_saves_the_current_step_and_exits_zero(corpus, tmp_path):
    steps = 12
    reference, run = tmp_path / "reference", tmp_path / "run"
    common = ["checkpoint.interval=100", "zero.stage=1"]
    torchrun(2, train_args(corpus, reference, *common, steps=steps))

    port = free_port()
    args = train_args(corpus, run, *common, "debug.sleep_at_step=4", "debug.sleep_seconds=3", steps=steps)
    env = cpu_env(DS_LAUNCH_ARGS=f"--num_gpus 2 --master_port {port}")
    proc = subprocess.Popen(
        ["bash", "launch/pretrain.sh", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(run, 4, [proc])
    time.sleep(1.0)  # inside step 4's injected sleep
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    stopped_at = max(r["step"] for r in metrics(run))
    assert stopped_at in (4, 5), out[-3000:]
    assert files.latest_pointer(ckpts(run)) == files.tag_for(stopped_at)
    assert files.verify(ckpts(run) / files.tag_for(stopped_at)) == []
    assert "received SIGTERM" in out

    assert not (run / "finished.json").exists()  # an auto-resume loop must relaunch

    relaunch = torchrun(2, train_args(corpus, run, *common, steps=steps))
    assert resumed_step(relaunch.stdout) == stopped_at
    assert json.loads((run / "finished.json").read_text())["step"] == steps
    ref = {r["step"]: r for r in metrics(reference)}
    rows = metrics(run)
    assert sorted(r["step"] for r in rows) == list(range(1, steps + 1))
    for r in rows:
        assert abs(r["loss"] - ref[r["step"]]["loss"]) <= 1e-6 * abs(ref[r["step"]]["loss"]), r["step"]
        assert r["consumed_samples"] == ref[r["step"]]["consumed_samples"]


def wait_for_step(run: Path, step: int, procs: list[subprocess.Popen], limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if (run / "metrics.jsonl").is_file() and any(r["step"] >= step for r in metrics(run)):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never came")


def test_slurm_style_ranks_save_on_usr1_and_exit_zero(corpus, tmp_path):
    """What `srun` + `#SBATCH --signal=USR1@300` does: every task is a rank (Slurm's variables) and
    every rank gets SIGUSR1 directly."""
    port = free_port()
    args = train_args(
        corpus, tmp_path, "debug.sleep_at_step=3", "debug.sleep_seconds=3", "zero.stage=1", steps=30
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bigtrain.pretrain", *args],
            cwd=REPO,
            env=cpu_env(
                SLURM_PROCID=str(rank),
                SLURM_NTASKS="2",
                SLURM_LOCALID=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        wait_for_step(tmp_path, 3, procs)
        time.sleep(1.0)
        for p in procs:
            p.send_signal(signal.SIGUSR1)
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "received SIGUSR1" in outputs[1]
    stopped_at = max(r["step"] for r in metrics(tmp_path))
    assert stopped_at in (3, 4)
    assert files.latest_pointer(ckpts(tmp_path)) == files.tag_for(stopped_at)
    assert sorted(p.name for p in (ckpts(tmp_path) / files.tag_for(stopped_at)).glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


def test_wall_clock_budget_stops_with_a_checkpoint(corpus, tmp_path):
    out = single(
        train_args(corpus, tmp_path, "train.max_minutes=0.12", "checkpoint.interval=0", steps=100000)
    )
    assert "stopping after step" in out.stdout and "train.max_minutes=0.12 nearly used" in out.stdout
    last = max(r["step"] for r in metrics(tmp_path))
    assert 0 < last < 100000
    assert files.latest_pointer(ckpts(tmp_path)) == files.tag_for(last)
    assert not (tmp_path / "finished.json").exists()


# ---------------------------------------------------------------------------- 5. non-finite
def test_nonfinite_stop_exits_before_saving_poisoned_weights(corpus, tmp_path):
    args = train_args(corpus, tmp_path, "checkpoint.interval=1", "debug.inject_nonfinite_at_step=3", steps=8)
    out = single([*args, "train.nonfinite=stop"], check=False)
    assert out.returncode != 0
    assert "step 3: non-finite loss nan; train.nonfinite=stop" in out.stderr
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    assert files.candidate_tags(ckpts(tmp_path)) == [files.tag_for(2), files.tag_for(1)]


@pytest.mark.parametrize(
    "nproc, overrides",
    [
        (1, []),
        (2, ["precision=bf16", "zero.stage=1", "debug.fault_rank=0"]),  # one rank's NaN reaches all
        (2, ["parallel.pipeline=2"]),  # the loss exists on the last stage only
    ],
    ids=["fp32-guard", "dp2-bf16-zero1", "pp2-fp32"],
)
def test_nonfinite_skip_leaves_parameters_bitwise_unchanged(corpus, tmp_path, nproc, overrides):
    args = train_args(
        corpus,
        tmp_path,
        "checkpoint.interval=1",
        "checkpoint.keep_last=0",
        "debug.inject_nonfinite_at_step=3",
        "optim.warmup_steps=0",
        *overrides,
        steps=5,
    )
    if nproc == 1:
        single(args)
    else:
        torchrun(nproc, args)
    rows = {r["step"]: r for r in metrics(tmp_path)}
    assert rows[3].get("skipped") is True and rows[3]["skipped_steps"] == 1
    assert all(not rows[s].get("skipped") for s in (1, 2, 4, 5))
    before, after = weights(tmp_path, 2), weights(tmp_path, 3)
    assert all((before[k] == after[k]).all() for k in before), "a skipped step changed parameters"
    assert any((after[k] != weights(tmp_path, 4)[k]).any() for k in after), "step 4 trained"
    assert rows[4]["lr"] == rows[3]["lr"], "the LR schedule advanced on a skipped step"
    meta = json.loads((ckpts(tmp_path) / files.tag_for(5) / files.META).read_text())
    assert meta["skipped_steps"] == 1 and meta["step"] == 5


@needs_precision("fp16")
def test_fp16_overflow_is_logged_and_the_loss_scale_survives_a_crash(corpus, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    # a finite but huge loss: fp16 gradients overflow (a NaN loss would be train.nonfinite's business)
    common = [
        "precision=fp16",
        "fp16.hysteresis=1",  # the first overflow halves the scale (default 2: the second in a row)
        "checkpoint.interval=4",
        "debug.inject_spike_at_step=3",
        "debug.spike_factor=1.0e+20",
    ]
    single(train_args(corpus, full, *common, steps=6))
    crashed = single(train_args(corpus, split, *common, "debug.crash_at_step=5", steps=6), check=False)
    assert "step 3: fp16 overflow, update skipped by dynamic loss scaling" in crashed.stdout
    single(train_args(corpus, split, *common, steps=6))
    ref = {r["step"]: r for r in metrics(full)}
    assert ref[3]["skipped"] and ref[4]["loss_scale"] == ref[2]["loss_scale"] / 2  # halved by the overflow
    masters = weights(full, 4)  # fp32 masters, not the fp16 model's rounded copies
    assert any((t != t.half().float()).any() for t in masters.values())
    resumed = [r for r in metrics(split) if r["step"] > 4]
    assert [r["step"] for r in resumed][-2:] == [5, 6]
    for r in resumed[-2:]:
        assert r["loss_scale"] == ref[r["step"]]["loss_scale"]  # restored, not the initial scale
        assert abs(r["loss"] - ref[r["step"]]["loss"]) <= 1e-6 * abs(ref[r["step"]]["loss"])


# ---------------------------------------------------------------------------- 6. a hung rank
def test_a_hung_rank_makes_every_process_exit_within_the_timeout(corpus, tmp_path):
    # The sleep outlasts any plausible exit, so the job ending before the rank wakes proves the timeout
    # ended it (a bound of timeout + a margin would measure this host's speed, not bigtrain).
    timeout_s, sleep_s = 15, 240
    args = train_args(
        corpus,
        tmp_path,
        f"train.dist_timeout_minutes={timeout_s / 60}",
        "debug.sleep_at_step=2",
        "debug.fault_rank=1",
        f"debug.sleep_seconds={sleep_s}",
        "checkpoint.save=false",
        "zero.stage=1",
        steps=6,
    )
    out = torchrun(2, args, check=False, timeout=300)
    ended = time.time()
    assert out.returncode != 0
    hung_at = next(r["time"] for r in metrics(tmp_path) if r["step"] == 2)
    assert ended - hung_at < sleep_s, f"{ended - hung_at:.0f}s after the rank hung: it woke up first"
    assert "bigtrain: rank 0: failed" in out.stderr
    assert "a peer rank died or hangs" in out.stderr or "a peer rank died" in out.stderr


# ---------------------------------------------------------------------------- loss spikes
def test_loss_spike_rolls_back_and_never_replays_the_batch(corpus, tmp_path):
    gbs = 8
    args = train_args(
        corpus,
        tmp_path,
        "checkpoint.interval=4",
        "train.spike_sigma=3",
        "train.spike_min_history=3",
        "train.spike_rollback=true",
        "debug.inject_spike_at_step=7",
        steps=10,
    )
    out = single(args)
    assert "loss spike at step 7" in out.stdout
    assert "rolled back to step_00000004" in out.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r and "threshold" not in r]
    assert any("threshold" in r and r["step"] == 7 for r in rows), "spike not in metrics.jsonl"
    # steps 5 and 6 ran twice (before the spike and after the rollback) with identical losses
    for step in (5, 6):
        losses = [r["loss"] for r in train_rows if r["step"] == step]
        assert len(losses) == 2 and losses[0] == losses[1], (step, losses)
    last = [r for r in train_rows if r["step"] == 10][-1]
    assert last["consumed_samples"] == 10 * gbs + gbs  # one global batch skipped
    meta = json.loads((ckpts(tmp_path) / files.tag_for(10) / files.META).read_text())
    assert meta["skipped_batches"] == [[6 * gbs, 7 * gbs]] and meta["rollbacks"] == 1
    spiked = [r["loss"] for r in train_rows if r["step"] == 7]
    assert len(spiked) == 2 and spiked[1] < spiked[0] / 5, spiked
