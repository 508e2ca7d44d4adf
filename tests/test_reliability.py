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
