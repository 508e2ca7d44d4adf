"""Fault handling for the training loop, as small pieces the trainer calls: exit signals and wall-clock
budget (save and exit 0), non-finite steps (skip or stop), loss spikes (log, optionally roll back), and
the ``debug.*`` fault injections used by the tests and by users validating a cluster.

Every decision that changes what the ranks do next (stop, roll back) is agreed by all ranks in one tiny
all-reduce per step, so no rank leaves a collective the others still wait in.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections import deque
from types import FrameType

import torch

from bigtrain.config import Config

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingError(RuntimeError):
    """A fault the run must stop on (exit non-zero), phrased for the user."""


class ExitSignals:
    """SIGTERM/SIGUSR1 request a save at the end of the current step; the loop stops afterwards."""

    def __init__(self, enabled: bool):
        self.received: str | None = None
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in EXIT_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(
                f"bigtrain: received {self.received}: saving a checkpoint at the end of this step, then exiting",
                file=sys.stderr,
                flush=True,
            )


_EXIT_SIGNALS: ExitSignals | None = None


def exit_signals(enabled: bool) -> ExitSignals:
    """The process's handlers, installed once: entry points call this before anything slow, so a
    signal during start-up (checkpoint verification, model build) is kept, not fatal."""
    global _EXIT_SIGNALS
    if _EXIT_SIGNALS is None:
        _EXIT_SIGNALS = ExitSignals(enabled)
    return _EXIT_SIGNALS


def register_with_launcher(rank: int) -> None:
    """Under ``bash launch/pretrain.sh`` the launcher forwards SIGTERM/SIGUSR1 to the PIDs listed in
    ``BIGTRAIN_PID_DIR`` (DeepSpeed's own launcher would kill the ranks instead)."""
    pid_dir = os.environ.get("BIGTRAIN_PID_DIR")
    if pid_dir and os.path.isdir(pid_dir):
        with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Logical OR of each flag over all ranks (one all-reduce)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class WallClock:
    """train.max_minutes: stop while one more step and a save still fit in the budget."""

    def __init__(self, max_minutes: float, started: float | None = None):
        """``started``: a ``time.time()`` value; default: when this process started (the scheduler's
        limit counts start-up too)."""
        self.budget = max_minutes * 60.0
        self.started = _process_start() if started is None else started
        self.startup = time.time() - self.started
        self.longest_step = 0.0
        self.last_save = 0.0

    def observe_step(self, seconds: float) -> None:
        self.longest_step = max(self.longest_step, seconds)

    def out_of_time(self) -> bool:
        if self.budget <= 0:
            return False
        # until a save was timed, assume it costs what start-up did (which loaded a checkpoint or built one)
        save = self.last_save or self.startup
        margin = 1.5 * self.longest_step + 2.0 * save + 5.0
        return time.time() - self.started + margin >= self.budget


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or restricted: count from now
        return time.time()


class SpikeDetector:
    """A loss above the running mean by ``sigma`` standard deviations of the last ``window`` losses.

    The standard deviation is floored at 1% of the mean so a flat stretch does not make every small
    wiggle a spike. Spikes and non-finite losses are not added to the history."""

    def __init__(self, sigma: float, window: int, min_history: int):
        self.sigma, self.min_history = sigma, min_history
        self.history: deque[float] = deque(maxlen=window)

    def threshold(self) -> float | None:
        if self.sigma <= 0 or len(self.history) < self.min_history:
            return None
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return mean + self.sigma * max(std, 0.01 * abs(mean))

    def is_spike(self, loss: float) -> bool:
        """Judge ``loss``; non-spikes join the history."""
        if not math.isfinite(loss):
            return False
        limit = self.threshold()
        if limit is not None and loss > limit:
            return True
        self.history.append(loss)
        return False


def loss_multiplier(cfg: Config, rank: int, step: int, batch_start: int) -> float:
    """debug injections into the loss of the step about to run (1.0 normally).

    ``batch_start``: the global sample index the step's batch starts at. The spike is tied to the batch
    (not the step number), so a rollback that skips that batch does not meet the spike again."""
    d = cfg.debug
    factor = 1.0
    if d.inject_nonfinite_at_step == step and d.fault_rank in (-1, rank):
        factor = float("nan")
    if d.inject_spike_at_step and batch_start == (d.inject_spike_at_step - 1) * cfg.train.global_batch_size:
        factor *= d.spike_factor
    return factor


def inject_process_faults(cfg: Config, rank: int, step: int) -> None:
    """debug.crash_at_step (SIGKILL, like `kill -9`) and debug.sleep_at_step (a hung rank)."""
    d = cfg.debug
    if d.fault_rank not in (-1, rank):
        return
    if d.crash_at_step and step == d.crash_at_step:
        print(f"debug.crash_at_step: SIGKILL to rank {rank} after step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if d.sleep_at_step and step == d.sleep_at_step:
        print(f"debug.sleep_at_step: rank {rank} sleeps {d.sleep_seconds:g}s after step {step}", flush=True)
        time.sleep(d.sleep_seconds)
