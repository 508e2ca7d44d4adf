"""SequentialWindows: the exact, unshuffled evaluation windows."""

from __future__ import annotations

import numpy as np
import pytest

from bigtrain.data import DataError, SequentialWindows
from tests.data.util import write_dataset


@pytest.fixture
def two_shards(tmp_path):
    write_dataset(tmp_path / "ev" / "ev_00000", [[10, 11, 12, 2], [13, 14, 2]])
    write_dataset(tmp_path / "ev" / "ev_00001", [[15, 16, 17, 18, 2], [19, 2]], dtype=np.uint16)
    return str(tmp_path / "ev" / "ev")


def test_windows_are_exact_and_cross_shard_boundaries(two_shards):
    windows = SequentialWindows(two_shards, seq_length=4)
    # Stream: 10 11 12 2 13 | 14 2 15 16 17 | 18 2 19 2 (partial, dropped)
    assert len(windows) == 2
    first, second = windows[0], windows[1]
    assert first["tokens"].tolist() == [10, 11, 12, 2] and first["labels"].tolist() == [11, 12, 2, 13]
    assert second["tokens"].tolist() == [14, 2, 15, 16] and second["labels"].tolist() == [2, 15, 16, 17]
    assert second["loss_mask"].tolist() == [1.0] * 4 and second["sample_id"] == 1
    with pytest.raises(IndexError):
        windows[2]


def test_windows_exact_multiple_and_other_name_forms(two_shards, tmp_path):
    windows = SequentialWindows(str(tmp_path / "ev"), seq_length=6)  # directory form; 14 tokens = 2 x 7
    assert len(windows) == 2
    assert windows[0]["tokens"].tolist() == [10, 11, 12, 2, 13, 14]
    assert windows[1]["tokens"].tolist() == [15, 16, 17, 18, 2, 19]  # the second shard, exactly
    assert windows[1]["labels"].tolist() == [16, 17, 18, 2, 19, 2]  # nothing left over: no window dropped
    assert SequentialWindows(str(tmp_path / "ev" / "ev_0000[1]"), 1)[0]["tokens"].tolist() == [15]


def test_windows_refuse_blends_and_too_little_data(two_shards):
    with pytest.raises(DataError, match="blend"):
        SequentialWindows([[0.5, two_shards], [0.5, two_shards]], 4)
    with pytest.raises(DataError, match="fewer than one window"):
        SequentialWindows(two_shards, 20)
