"""bigtrain.planner.comm_bytes against the collectives a real 2-rank gloo run issues.

One ``torchrun`` launch (tests/comm_count_worker.py) trains the tiny config through ``bigtrain.pretrain``
five times in the same two processes: DP2 at ZeRO-0, 1, 2 and 3, and TP2, each with 2 micro-batches per
rank per step (so what happens once per step and what happens per micro-batch differ). Every
``torch.distributed`` call inside ``Trainer.train_step`` is counted; the step's payload, by group and
operation, must equal the planner's formula exactly. Left out, and checked to be only that: scalars
(token count, loss mean, gradient norm, overflow flag) and calls on groups of one rank (no traffic).
ZeRO-3 is counted on its second step: the first records DeepSpeed's fetch trace (parameters gathered
one by one, integer trace checks), the steady state the planner predicts starts after it."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import pytest

from bigtrain import planner
from bigtrain.config import load_config
from tests.conftest import REPO, free_port, run_cmd

TINY = str(REPO / "configs" / "tiny.yaml")
# tiny.yaml: 2 blocks, h=64, 32 tokens x micro-batch 2; global batch 8 at DP2 / 4 at TP2: 2 micro-batches
# per rank per step. ZeRO-3 keeps the five 64-element norms persistent, gathers the matrices.
COMMON = ["checkpoint.save=false", "train.micro_batch_size=2"]
RUNS = {
    "dp2_zero0": ["zero.stage=0", "train.global_batch_size=8"],
    "dp2_zero1": ["zero.stage=1", "train.global_batch_size=8"],
    "dp2_zero2": ["zero.stage=2", "train.global_batch_size=8"],
    "dp2_zero3": [
        "zero.stage=3",
        "train.global_batch_size=8",
        "zero.stage3_param_persistence_threshold=1000",
    ],
    "tp2": ["parallel.tensor=2", "train.global_batch_size=4"],
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true", "train.global_batch_size=4"],
    "cp2": ["parallel.context=2", "train.global_batch_size=4"],
    "cp2_full": ["parallel.context=2", "train.global_batch_size=4", "activation_checkpointing=full"],
}
STEPS = {"dp2_zero3": 2}  # the step counted; the others are the same from the first step on
KEYS = {
    ("dp", "all_reduce"): "data_all_reduce",
    ("dp", "all_gather_into_tensor"): "data_all_gather",
    ("dp", "_all_gather_base"): "data_all_gather",
    ("dp", "all_gather"): "data_all_gather",
    ("dp", "reduce_scatter_tensor"): "data_reduce_scatter",
    ("dp", "_reduce_scatter_base"): "data_reduce_scatter",
    ("tp", "all_reduce"): "tensor_all_reduce",
    ("tp", "all_gather_into_tensor"): "tensor_all_gather",
    ("tp", "_all_gather_base"): "tensor_all_gather",
    ("tp", "reduce_scatter_tensor"): "tensor_reduce_scatter",
    ("tp", "_reduce_scatter_base"): "tensor_reduce_scatter",
    ("cp", "all_to_all_single"): "context_all_to_all",
}


def _config(name: str):
    return load_config(TINY, [*COMMON, *RUNS[name]]).resolve(2)


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """{run: {rank: [its records]}} from one 2-rank launch (~20-110 s on 2 busy cores)."""
    tmp = tmp_path_factory.mktemp("comm")
    runs = {}
    for name, overrides in RUNS.items():
        args = ["--config", TINY, "--set", *COMMON, *overrides, f"train.steps={STEPS.get(name, 1)}"]
        runs[name] = {"port": free_port(), "args": [*args, f"train.run_dir={tmp / name}"]}
    (tmp / "runs.json").write_text(json.dumps(runs))
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    run_cmd(
        [*launcher, "-m", "tests.comm_count_worker", str(tmp / "out"), str(tmp / "runs.json")], timeout=400
    )
    out: dict[str, dict[int, list[dict]]] = defaultdict(dict)
    for rank in (0, 1):
        records = json.loads((tmp / "out" / f"rank{rank}.json").read_text())
        for name in RUNS:
            out[name][rank] = [r for r in records if r["run"] == name]
    return out


def _step(records: list[dict], name: str, step: int | None = None) -> list[dict]:
    """The records of the counted step (or of ``step``)."""
    return [r for r in records if r["phase"] == f"step{step or STEPS.get(name, 1)}"]


def _measured(records: list[dict]) -> tuple[dict[str, float], list[dict]]:
    """(payload bytes by comm_bytes key, the records left out), every other record an error."""
    volume = dict.fromkeys(KEYS.values(), 0.0)
    left_out, unexpected = [], []
    for r in records:
        if r["group_size"] == 1 or r["numel"] == 1:
            left_out.append(r)
        elif (r["group"], r["op"]) in KEYS:
            volume[KEYS[r["group"], r["op"]]] += r["bytes"]
        else:
            unexpected.append(r)
    assert not unexpected, unexpected
    return volume, left_out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_counted_collective_bytes_match_comm_bytes(counted, name):
    """Measured (rank 0 = rank 1), payload bytes per step, fp32 (4-byte parameters, gradients,
    activations), p = 139,584 parameters, t x h = 64 x 64:

    - ZeRO-0: all-reduce 558,336 (p x 4, once at the boundary).
    - ZeRO-1: all-reduce 558,336 + parameter all-gather 558,336 (two calls: 139,264 + 320 elements).
    - ZeRO-2: all-reduce 1,116,672 (once per micro-batch) + all-gather 558,336.
    - ZeRO-3 (step 2): reduce-scatter 1,116,672 (per micro-batch) + all-gather 1,115,392 (139,264
      non-persistent elements per micro-batch, gathered once for forward and backward, + the 320 persistent
      ones after the step).
    - TP2: all-reduce 329,216 = 2 micro-batches x (10 x [64, 64] + 3 x [64]) x 4 bytes.
    - TP2+SP: per micro-batch all-gather (6 x 2 blocks + 1 + 2) x [64, 64], reduce-scatter (4 x 2 + 1 + 1)
      x [64, 64], all-reduce the 5 norm-weight gradients [64] and the cross entropy's 3 x [64], x 4 bytes
      x 2 micro-batches: 491,520 + 327,680 + 4,608.
    - CP2 (Ulysses, 16 of the 32 positions per rank): per micro-batch and block q and the attention output
      ([16, 2, 4 heads, 16]) and k, v ([16, 2, 2, 16]) all-to-all'd forward and backward, x 2 blocks x 2
      micro-batches x 4 bytes: 196,608 (full recomputation: forward again, 294,912); the gradient
      all-reduce 558,336 over data x context.
    """
    cfg = _config(name)
    predicted = planner.comm_bytes(cfg, planner.Layout.of(cfg))
    per_rank = {}
    for rank, everything in counted[name].items():
        records = _step(everything, name)
        assert records, f"{name}: nothing counted on rank {rank}"
        volume, left_out = _measured(records)
        # what is left out is bookkeeping: a handful of scalars per step, and no-traffic single-rank calls
        assert sum(r["numel"] == 1 and r["group_size"] > 1 for r in left_out) <= 5, left_out
        per_rank[rank] = volume
        assert volume == pytest.approx(predicted, abs=0), (name, rank, volume, predicted)
    assert per_rank[0] == per_rank[1]


@pytest.mark.slow
def test_tensor_parallel_all_reduces_per_micro_batch(counted):
    """At TP=2 without sequence parallelism megatron-core issues per micro-batch 4 all-reduces of [t, h]
    per block, one for the vocab-parallel embedding's output and one for the output layer's input
    gradient (4 L + 2 = 10 here), and three fp32 [t] for the vocab-parallel cross entropy."""
    cfg = _config("tp2")
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    shapes = defaultdict(int)
    for r in _step(counted["tp2"][0], "tp2"):
        if r["group"] == "tp" and r["numel"] > 1:
            shapes[r["numel"], r["dtype"]] += 1
    accum = cfg.derived.grad_accum_steps
    assert accum == 2
    assert dict(shapes) == {
        (tokens * cfg.model.hidden_size, "torch.float32"): accum * (4 * cfg.model.num_layers + 2),
        (tokens, "torch.float32"): accum * 3,
    }


@pytest.mark.slow
def test_zero3_first_step_gathers_more_than_the_steady_state(counted):
    """Why ZeRO-3 is counted on step 2: on step 1 DeepSpeed records its fetch trace, gathering parameter by
    parameter in forward and again in backward, and checks the trace across ranks (integer broadcasts);
    from step 2 the trace prefetches them together and keeps them for backward (within
    stage3_max_reuse_distance), as comm_bytes predicts."""
    records = counted["dp2_zero3"][0]
    first, second = _step(records, "dp2_zero3", 1), _step(records, "dp2_zero3", 2)
    gathered = [
        sum(r["bytes"] for r in step if r["op"] == "all_gather_into_tensor") for step in (first, second)
    ]
    cfg = _config("dp2_zero3")
    assert (
        gathered[1]
        == planner.comm_bytes(cfg, planner.Layout.of(cfg))["data_all_gather"]
        == (2 * (139_584 - 320) + 320) * 4
    )
    assert gathered[0] > 1.5 * gathered[1]  # measured: 2,102,272 vs 1,115,392 bytes
    assert any(r["op"] == "broadcast" for r in first) and not any(r["op"] == "broadcast" for r in second)


def test_comm_bytes_terms_by_hand():
    """7B bf16 (fp32 gradient reduction), 2-byte parameters and activations, by hand."""
    cfg = load_config(REPO / "configs" / "llama-7b.yaml").resolve(8)
    m = cfg.model
    vocab = cfg.derived.padded_vocab_size
    p = planner.stage_parameters(m, vocab, 1, 1)
    accum = cfg.train.global_batch_size // (2 * 8)
    for zero, expected in {
        1: {"data_all_reduce": 4 * p, "data_all_gather": 2 * p},  # bf16 ZeRO-0 runs as ZeRO-1
        2: {"data_all_reduce": accum * 4 * p, "data_all_gather": 2 * p},
    }.items():
        for z in (0, 1) if zero == 1 else (zero,):
            volume = planner.comm_bytes(cfg, planner.Layout(data=8, zero=z, micro_batch=2))
            assert {k: v for k, v in volume.items() if v} == pytest.approx(expected), z
    # ZeRO-3, 6.7B parameters: beyond half the reuse distance (5e8) the backward gathers again
    s = planner._small_parameters(m, vocab, 1, 1, cfg.zero.stage3_param_persistence_threshold)
    z3 = planner.comm_bytes(cfg, planner.Layout(data=8, zero=3, micro_batch=2))
    regathered = p - s - planner.DS_MAX_REUSE_DISTANCE / 2
    assert z3["data_all_gather"] == pytest.approx(
        (accum * (2 * (p - s) - planner.DS_MAX_REUSE_DISTANCE / 2) + s) * 2
    )
    assert regathered > 0.9 * p
    assert z3["data_reduce_scatter"] == pytest.approx(accum * 4 * p)
    # TP8, one stage: (4 x 32 + 2) [t, h] bf16 all-reduces + 3 fp32 [t] per micro-batch
    tp = planner.Layout(tensor=8, data=1, micro_batch=1)
    t = m.seq_length
    assert planner.comm_bytes(cfg, tp)["tensor_all_reduce"] == pytest.approx(
        cfg.train.global_batch_size * ((4 * 32 + 2) * t * m.hidden_size * 2 + 3 * t * 4)
    )
    # step_time: payload x ring factor / bus bandwidth
    hw = planner.Hardware(intra_node_gbps=100.0)
    hw.gpus_per_node = 8
    layout = planner.Layout(data=8, zero=2, micro_batch=2)
    volume = planner.comm_bytes(cfg, layout)
    expected = (volume["data_all_reduce"] * 2 * 7 / 8 + volume["data_all_gather"] * 7 / 8) / 100e9
    assert planner.step_time(cfg, layout, hw)["data_comm"] == pytest.approx(expected)
    assert planner.wire_factor("all_reduce", 1) == 0.0
    tp_time = planner.step_time(cfg, tp, hw)["tensor_comm"]
    assert tp_time == pytest.approx(planner.comm_bytes(cfg, tp)["tensor_all_reduce"] * 2 * 7 / 8 / 100e9)


def test_sequence_and_context_parallel_terms_by_hand():
    """The 128k preset (TP4+SP x CP2 x DP8, bf16, full recompute), per rank and step, by hand: each rank
    holds t = 65,536 positions; 16 samples over 8 data ranks: 2 micro-batches."""
    cfg = load_config(REPO / "configs" / "llama-8b-128k.yaml").resolve(64)
    m = cfg.model
    layout = planner.Layout(tensor=4, data=8, zero=1, checkpointing="full", sequence_parallel=True, context=2)
    volume = planner.comm_bytes(cfg, layout)
    accum, t, h, L = 2, 65536, 4096, 32
    th = t * h * 2
    assert volume["tensor_all_gather"] == accum * (8 * L + 3) * th  # 6 + 2 recomputed per block, ends
    assert volume["tensor_reduce_scatter"] == accum * (6 * L + 2) * th
    assert volume["tensor_all_reduce"] == accum * ((2 * L + 1) * h * 2 + 3 * t * 4)  # norm grads, loss
    # q (32/4 heads) and the output, k and v (8/4 heads) of 128 features, forward, backward, recomputed
    assert volume["context_all_to_all"] == accum * 3 * L * t * (2 * 8 + 2 * 2) * 128 * 2
    # ZeRO-1 over data x context = 16 ranks: the fp32 gradient all-reduce and the bf16 parameter gather
    p = planner.stage_parameters(m, cfg.derived.padded_vocab_size, 4, 1)
    assert (volume["data_all_reduce"], volume["data_all_gather"]) == (4 * p, 2 * p)
    hw = planner.Hardware(intra_node_gbps=100.0)
    s = planner.step_time(cfg, layout, hw)
    tensor = (volume["tensor_all_gather"] + volume["tensor_reduce_scatter"]) * 3 / 4
    tensor += volume["tensor_all_reduce"] * 2 * 3 / 4
    assert s["tensor_comm"] == pytest.approx(tensor / 100e9)
    assert s["context_comm"] == pytest.approx(volume["context_all_to_all"] / 2 / 100e9)  # TP x CP in a node
    without = planner.step_time(cfg, planner.replace(layout, context=1, data=16), hw)
    assert without["context_comm"] == 0 and without["data_comm"] == pytest.approx(s["data_comm"])
