"""Context parallelism (``parallel.context``, DeepSpeed-Ulysses) at the gradient level, and its
validation before any process group.

One 2-process launch (tests/models/context_grad_worker.py) compares, on the same weights and batch, the
tiny llama at context 2 (each rank its half of the sequence, gradients summed over the context group as
DeepSpeed does) with one unparallelized model: the loss and every parameter's gradient agree within
1e-5 relative (acceptance 1); with every chunk rotated from position 0 (``debug.skip_rotary_offset``)
they do not (acceptance 2); with the second half of every sequence masked, context rank 1 trains no
token and its loss is 0 and its gradients finite (acceptance 4)."""

from __future__ import annotations

import json
import sys

import pytest

from bigtrain.config import ConfigError, load_config
from tests.conftest import REPO, run_with_port


@pytest.fixture(scope="module")
def context_grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("context_grads") / "out.json"

    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                "-m", "tests.models.context_grad_worker", str(out)]  # fmt: skip

    run_with_port(command, timeout=300)
    return {r["rank"]: r for r in json.loads(out.read_text())}


@pytest.mark.slow
def test_context_2_gradients_equal_one_process(context_grads):
    for rank, r in context_grads.items():
        case = r["all"]
        assert case["loss_context"] == pytest.approx(case["loss_reference"], rel=1e-6)
        worst = max(case["grad_rel"].values())
        print(f"rank {rank}: every parameter's gradient within {worst:.1e} of one process's")
        assert worst <= 1e-5, {n: v for n, v in case["grad_rel"].items() if v > 1e-5}
        assert len(case["grad_rel"]) == 2 + 2 * 6 + 1  # embedding, 2 blocks x 6 tensors, final norm, output


@pytest.mark.slow
def test_without_the_rotary_offset_gradients_differ(context_grads):
    worst = context_grads[0]["all"]["control_grad_rel"]
    print(f"control (every chunk rotated from position 0): worst gradient difference {worst:.1e}")
    assert worst > 1e-3


@pytest.mark.slow
def test_a_rank_with_every_token_masked_is_finite(context_grads):
    masked, trained = context_grads[1]["half"], context_grads[0]["half"]
    assert masked["own_loss"] == 0.0 and masked["own_grads_finite"]
    assert trained["own_loss"] == pytest.approx(trained["loss_reference"], rel=1e-6)
    assert max(masked["grad_rel"].values()) <= 1e-5


def _resolve(world: int, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", list(overrides)).resolve(world)


@pytest.mark.parametrize(
    ("world", "overrides", "needles"),
    [
        (
            4,
            ["parallel.context=2", "parallel.tensor=2"],
            ["parallel.context 2", "model.num_kv_heads 2", "= 1"],
        ),
        (2, ["parallel.context=2", "model.seq_length=33"], ["model.seq_length 33", "divisible"]),
        (4, ["parallel.context=2", "parallel.pipeline=2"], ["parallel.pipeline 2"]),
        (3, ["parallel.context=2"], ["world size 3", "parallel.context"]),
        (2, ["parallel.context=2", "model.family=bert"], ["model.family bert"]),
        (2, ["parallel.context=2", "zero.stage=3"], ["parallel.context 2", "zero.stage 3"]),
        (
            4,
            [
                "parallel.context=2",
                "parallel.tensor=2",
                "parallel.sequence_parallel=true",
                "model.num_kv_heads=4",
                "model.seq_length=34",
            ],
            ["model.seq_length 34", "sequence parallel", "4"],
        ),  # fmt: skip
    ],
)
def test_context_parallel_refusals_name_the_fields(world, overrides, needles):
    with pytest.raises(ConfigError) as e:
        _resolve(world, *overrides)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_context_parallel_sizes():
    cfg = _resolve(8, "parallel.context=2", "parallel.tensor=2", "model.num_kv_heads=4")
    assert cfg.derived.data_parallel_size == 2  # 8 ranks = tensor 2 x context 2 x data 2
    assert cfg.derived.grad_accum_steps == 2  # global 8 / (micro 2 x data 2): context ranks share samples
