"""Shared test helpers: free ports, subprocess runs with timeouts, CPU-friendly environment."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# One toolchain for every process: DeepSpeed JIT-builds a CPU comm op with the first `ninja` on PATH,
# and two ninja versions alternating throw away each other's build log (a 40-120 s rebuild each time).
os.environ["PATH"] = str(VENV_BIN) + os.pathsep + os.environ.get("PATH", "")
# Tests run CPU layouts (gloo) also on GPU machines: DeepSpeed must not pick its CUDA accelerator (it does
# so at import, before any bigtrain config is read). `gpu` tests remove this for their processes.
os.environ["DS_ACCELERATOR"] = "cpu"


def free_port() -> int:
    """A TCP port nobody listens on right now (each multi-process test gets its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
)


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: repo importable, one thread per rank, no GPU, venv on PATH."""
    env = dict(os.environ)
    for var in LAUNCHER_VARS:  # a child is a fresh job, never a rank of this process's world
        env.pop(var, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def gpu_env(**extra: str) -> dict[str, str]:
    """cpu_env for the `gpu` tests' child processes: GPUs visible, DeepSpeed free to pick CUDA."""
    env = cpu_env(**extra)
    env.pop("CUDA_VISIBLE_DEVICES")
    env.pop("DS_ACCELERATOR")
    return env


def run_cmd(
    args: list[str], timeout: float = 300, check: bool = True, **kwargs
) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout; on failure the output is in the assertion message."""
    kwargs.setdefault("env", cpu_env())
    kwargs.setdefault("cwd", REPO)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(failure_message(proc))
    return proc


def failure_message(proc: subprocess.CompletedProcess) -> str:
    return (
        f"command failed ({proc.returncode}): {' '.join(map(str, proc.args))}\n"
        f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )


def run_with_port(
    make_args, timeout: float = 300, check: bool = True, tries: int = 3, env_for=None, **kwargs
):
    """``run_cmd(make_args(port))`` on a fresh free port (``env_for(port)`` gives its environment),
    retried when another process grabbed the port between our probe and the rendezvous (EADDRINUSE),
    which a busy machine makes possible."""
    for _ in range(tries):
        port = free_port()
        if env_for is not None:
            kwargs["env"] = env_for(port)
        proc = run_cmd(make_args(port), timeout=timeout, check=False, **kwargs)
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stdout + proc.stderr:
            break
    if check and proc.returncode != 0:
        raise AssertionError(failure_message(proc))
    return proc


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


@functools.cache
def host_supports(precision: str) -> bool:
    """Whether this host's CPU can train in ``precision`` (the same question pre-flight asks)."""
    import torch

    from bigtrain.distributed import precision_supported

    return precision_supported(precision, torch.device("cpu"))


def needs_precision(precision: str) -> pytest.MarkDecorator:
    """Skip (reason shown under ``-ra``) a CPU test that trains in ``precision`` where this host cannot:
    DeepSpeed's CPU accelerator has fp16 only where oneDNN has it (AVX512-FP16/AMX; not on AMD EPYC).
    What such hosts do instead, and the fp16 path itself, are tested everywhere (tests/test_host.py)."""
    return pytest.mark.skipif(
        not host_supports(precision),
        reason=f"this host's CPU cannot train in {precision} (DeepSpeed's CPU accelerator: oneDNN has no "
        f"{precision} here); bigtrain refuses precision={precision} on it",
    )


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
