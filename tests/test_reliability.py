"""The fault-handling pieces on their own: spike detection, the wall-clock budget, fault injection
targeting, and the config checks of the reliability keys."""

from __future__ import annotations

import math

import pytest

from bigtrain.config import ConfigError, load_config
from bigtrain.reliability import SpikeDetector, WallClock, loss_multiplier


def test_spike_detector_needs_history_and_ignores_spikes_in_its_statistics():
    d = SpikeDetector(sigma=3.0, window=5, min_history=3)
    assert not d.is_spike(100.0)  # no history yet: never a spike
    d = SpikeDetector(sigma=3.0, window=5, min_history=3)
    for loss in (5.0, 4.8, 4.9):
        assert not d.is_spike(loss)
    assert d.threshold() == pytest.approx(4.9 + 3 * max(math.sqrt(0.02 / 3), 0.049))
    assert d.is_spike(9.0)
    assert list(d.history) == [5.0, 4.8, 4.9]  # the spike did not join the statistics
    assert not d.is_spike(4.95)
    assert not d.is_spike(float("nan"))  # non-finite losses are the non-finite policy's business
    assert SpikeDetector(sigma=0.0, window=5, min_history=1).threshold() is None


def test_flat_losses_do_not_make_every_wiggle_a_spike():
    d = SpikeDetector(sigma=3.0, window=10, min_history=3)
    for _ in range(5):
        d.is_spike(2.0)
    assert not d.is_spike(2.05)  # std floored at 1% of the mean
    assert d.is_spike(2.1)


def test_wall_clock_leaves_room_for_a_step_and_a_save(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("bigtrain.reliability.time.time", lambda: now[0])
    clock = WallClock(max_minutes=1.0, started=990.0)  # the process started 10 s ago
    clock.observe_step(5.0)
    # no save timed yet: assume start-up's 10 s: 1000-990 + 1.5*5 + 2*10 + 5 = 42.5 < 60
    assert not clock.out_of_time()
    now[0] = 1008.0  # 18 + 7.5 + 20 + 5 = 50.5
    assert not clock.out_of_time()
    clock.last_save = 15.0  # a measured save replaces the estimate: 18 + 7.5 + 30 + 5 = 60.5
    assert clock.out_of_time()
    assert not WallClock(0.0).out_of_time()


def test_injections_hit_the_configured_rank_and_batch():
    cfg = load_config(
        None, ["debug.inject_nonfinite_at_step=3", "debug.fault_rank=1", "train.global_batch_size=8"]
    )
    assert math.isnan(loss_multiplier(cfg, rank=1, step=3, batch_start=16))
    assert loss_multiplier(cfg, rank=0, step=3, batch_start=16) == 1.0
    assert loss_multiplier(cfg, rank=1, step=4, batch_start=24) == 1.0
    cfg = load_config(
        None, ["debug.inject_spike_at_step=7", "debug.spike_factor=10", "train.global_batch_size=8"]
    )
    assert loss_multiplier(cfg, rank=0, step=7, batch_start=48) == 10.0
    # after a rollback skipped that batch, step 7 starts at another batch: no second spike
    assert loss_multiplier(cfg, rank=0, step=7, batch_start=56) == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nonfinite=ignore", "train.nonfinite must be skip|stop"),
        ("train.max_consecutive_skips=0", "train.max_consecutive_skips must be >= 1"),
        ("train.spike_rollback=true", "train.spike_rollback needs train.spike_sigma > 0"),
        ("debug.kill_in_save=nowhere", "debug.kill_in_save must be one of tmp_created"),
        ("train.dist_timeout_minutes=0", "train.dist_timeout_minutes must be > 0"),
    ],
)
def test_reliability_keys_are_validated(override, message):
    cfg = load_config(None, ["model.vocab_size=512", "data.mock=true", override])
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        cfg.resolve(1)


def _trainer(tmp_path, *overrides):
    """A Trainer around no engine (nothing here runs a step): enough for its rules and hook states."""
    from types import SimpleNamespace

    import torch

    from bigtrain.trainer import Trainer

    cfg = load_config(
        None,
        ["data.mock=true", "model.vocab_size=64", "train.steps=10", f"train.run_dir={tmp_path}", "logging.tensorboard=false",
         "train.exit_signal_save=false", *overrides],
    ).resolve(1)  # fmt: skip
    dist = SimpleNamespace(device=torch.device("cpu"), is_main=False, rank=0)
    trainer = Trainer(cfg, dist, None, lambda consumed: iter(()))
    trainer.metrics.close()
    return trainer


def test_one_due_rule_and_early_completion_without_rewriting_steps(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.state.step = 4
    assert trainer.due(2) and not trainer.due(3) and not trainer.due(0)
    trainer.state.step = 10  # the last step: everything is due
    assert trainer.due(3) and trainer.due(0) and trainer.finished
    trainer.state.step = 7
    assert not trainer.due(3) and not trainer.finished
    trainer.request_stop("early stopping", complete=True)  # this step becomes the last one
    assert trainer.due(3) and trainer.due(0) and trainer.finished and trainer.stop_reason is None
    assert trainer.cfg.train.steps == 10
    trainer.request_stop("signal SIGTERM")  # an interrupted run is not finished: a relaunch resumes it
    trainer.request_stop("train.max_minutes=1 nearly used")
    assert trainer.stop_reason == "signal SIGTERM" and not trainer.finished


def test_hook_states_round_trip_through_a_checkpoint_dict(tmp_path):
    import json

    from bigtrain.hooks import NonFinitePolicy, SpikeGuard

    def parts(trainer):
        hooks = list(trainer._stateful_hooks())
        return next(h for h in hooks if isinstance(h, SpikeGuard)), next(
            h for h in hooks if isinstance(h, NonFinitePolicy)
        )

    spike_rule = ("train.spike_sigma=3", "train.spike_min_history=3")
    trainer = _trainer(tmp_path, *spike_rule)
    spikes, nonfinite = parts(trainer)
    for loss in (5.0, 4.8, 4.9):
        spikes.spikes.is_spike(loss)
    nonfinite.consecutive_skips = 2
    saved = json.loads(json.dumps({"step": 3, **trainer.hook_states()}))  # as bigtrain.json stores it
    assert saved["spike_history"] == [5.0, 4.8, 4.9] and saved["nonfinite"] == {"consecutive_skips": 2}

    resumed = _trainer(tmp_path, *spike_rule)
    resumed.adopt_checkpoint("step_00000003", saved)
    spikes2, nonfinite2 = parts(resumed)
    assert list(spikes2.spikes.history) == [5.0, 4.8, 4.9] and nonfinite2.consecutive_skips == 2
    assert spikes2.spikes.is_spike(9.0)  # judged as the uninterrupted run would
    assert resumed.protect == ("step_00000003",) and resumed.last_saved_step == 3
    # a checkpoint of an older bigtrain (no hook keys) leaves the hooks as they are
    older = _trainer(tmp_path, *spike_rule)
    older.adopt_checkpoint("step_00000003", {"step": 3})
    assert not parts(older)[0].spikes.history and parts(older)[1].consecutive_skips == 0
