"""bigtrain.generation: the KV cache reproduces the full forward, sampling follows temperature/top-p,
and a native model leaves no rank or port behind for processes started later."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tools.conftest import HF_ARCH, venv_on_path

pytestmark = pytest.mark.slow


def test_cached_chunks_equal_full_forward(imported):
    from bigtrain.generation import NativeModel

    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    tokens = torch.randint(0, HF_ARCH["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(2))
    with venv_on_path(), NativeModel.from_checkpoint(imported) as model:
        assert {k: os.environ.get(k) for k in before} == before
        full = model.logits(tokens)
        cache = model.new_cache(30)
        pieces = [model.logits(tokens[:, a:b], cache) for a, b in ((0, 7), (7, 8), (8, 19), (19, 30))]
        assert cache[0].length == 30
        with pytest.raises(ValueError, match="KV cache holds 30 positions"):
            model.logits(tokens[:, :1], cache)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)

    # stop ids: one id or several (generation_config's eos_token_id), stopping after the first met
    with venv_on_path(), NativeModel.from_checkpoint(imported) as model:
        free = model.generate([1, 5, 9], 8)
        second = free[1]
        first_at = free.index(second) + 1  # where that id first comes (it may also be the first token)
        assert model.generate([1, 5, 9], 8, eos_id=second) == free[:first_at]
        assert model.generate([1, 5, 9], 8, eos_id=[HF_ARCH["vocab_size"] + 7, second]) == free[:first_at]
        assert model.generate([1, 5, 9], 8, eos_id=[HF_ARCH["vocab_size"] + 7]) == free


def test_sampling_respects_temperature_and_top_p():
    from bigtrain.generation import sample

    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 1.0, gen) == 1  # temperature 0: argmax
    assert {sample(logits, 1.0, 0.01, gen) for _ in range(50)} == {1}  # nucleus of one token
    drawn = {sample(logits, 1.0, 0.9, gen) for _ in range(200)}
    assert drawn == {1, 2}  # 0 and 3 lie outside the 0.9 nucleus
    assert {sample(logits, 100.0, 1.0, gen) for _ in range(400)} == {0, 1, 2, 3}  # hot: everything
