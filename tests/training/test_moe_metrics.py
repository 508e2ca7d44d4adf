"""MoE routing metrics (bigtrain.moe_stats, hooks.MoERouting) in real runs, and acceptance item 4 of
issue 19: the load-balancing loss balances the experts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from tests.models.test_layout import world_of_one  # noqa: F401  (fixture)
from tests.training.helpers import VOCAB, metrics, single, torchrun

MOE_TINY = str(REPO / "configs" / "moe-tiny.yaml")


def _run(run_dir: Path, *overrides: str, steps: int = 3) -> list[dict]:
    proc = single(
        ["--config", MOE_TINY, "--set", f"train.run_dir={run_dir}", f"train.steps={steps}", *overrides],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "model.moe.num_experts=0" not in overrides:  # the start-up line: all experts vs one token's
        assert "model: 189,248 parameters, 140,096 active per token (top-2 experts)" in proc.stdout
    return metrics(run_dir)


def test_moe_run_logs_routing_metrics(tmp_path):
    """Every logged step of a moe-tiny run has the aux and z losses, per-block expert fractions summing
    to 1, a load ratio >= 1 consistent with them, and with a capacity factor the dropped fraction;
    TensorBoard gets one scalar per block and expert."""
    rows = _run(tmp_path / "run", "model.moe.capacity_factor=1.0", "logging.tensorboard=true")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        # HF's per-block value is top_k at perfect balance; random routing sits near it
        assert 1.5 < r["moe_aux_loss"] < 4.0, r
        assert r["moe_z_loss"] > 0
        fractions = np.array(r["moe_expert_fraction"])
        assert fractions.shape == (2, 4)  # 2 MoE blocks x 4 experts
        assert np.allclose(fractions.sum(1), 1.0, atol=1e-5)
        worst = max(row.max() / row.min() for row in fractions)
        assert r["moe_load_ratio"] >= 1.0
        assert r["moe_load_ratio"] == pytest.approx(worst, rel=1e-4)
        # capacity 1.0: each expert takes at most tokens*top_k/E slots of a micro-batch: a slot is
        # dropped whenever routing is not perfectly even
        assert 0.0 <= r["moe_dropped_fraction"] < 0.5
    assert any(r["moe_dropped_fraction"] > 0 for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/moe_aux_loss", "train/moe_load_ratio", "train/moe_expert_fraction/1/3"} <= tags


def test_dense_run_logs_no_moe_keys(tmp_path):
    rows = _run(tmp_path / "run", "model.moe.num_experts=0", "model.hf_model_type=llama", steps=1)
    assert not [k for k in rows[0] if k.startswith("moe_")]


def test_routing_counted_once_per_training_forward(world_of_one):  # noqa: F811
    """Full recomputation runs each MoE block's forward again in backward: its routing is counted once,
    megatron's recorded aux losses (recorded on both forwards) averaged per forward; an evaluation
    forward counts nothing. Values equal those of the same step without recomputation."""
    from bigtrain.config import load_config
    from bigtrain.distributed import init_distributed
    from bigtrain.moe_stats import RoutingStats
    from bigtrain.registry import build_model

    results = {}
    init_distributed(load_config(MOE_TINY).resolve(1))  # one layout for both
    for checkpointing in ("none", "full"):
        cfg = load_config(MOE_TINY, [f"activation_checkpointing={checkpointing}"]).resolve(1)
        torch.manual_seed(0)
        model = build_model(cfg)
        stats = RoutingStats(cfg.model, model)
        stats.reset()
        b, s = 2, cfg.model.seq_length
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # two micro-batches
            model(tokens, tokens, torch.full((b, s), 1.0 / (2 * b * s))).backward()
        assert stats.calls == [4 if checkpointing == "full" else 2] * 2
        assert stats.tokens.tolist() == [2 * b * s] * 2
        assert stats.counts.sum(1).tolist() == [2 * b * s * 2] * 2  # top-2: two slots per token
        model.eval()
        with torch.no_grad():
            model(tokens, tokens, torch.ones(b, s))
        assert stats.tokens.tolist() == [2 * b * s] * 2
        results[checkpointing] = stats.record()
        stats.reset()
        assert stats.counts.sum() == 0
    plain, recomputed = results["none"], results["full"]
    assert recomputed["moe_expert_fraction"] == plain["moe_expert_fraction"]
    assert recomputed["moe_aux_loss"] == pytest.approx(plain["moe_aux_loss"], rel=1e-6)
    assert recomputed["moe_z_loss"] == pytest.approx(plain["moe_z_loss"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [("parallel.tensor=1",), ("parallel.tensor=2", "parallel.sequence_parallel=true")],
    ids=["dp2", "tp2-sp"],
)
def test_routing_metrics_are_global_under_data_and_tensor_parallelism(tmp_path, layout):
    """2 ranks, DP2 (each rank routes half the samples) or TP2+SP (each routes half the positions): the
    logged fractions equal the single-process run's exactly (the same tokens, weights and routing), the
    aux loss (summed over tensor ranks by megatron's convention) and z-loss (averaged) within 1e-6."""
    sets = ["--config", MOE_TINY, "--set", "train.steps=3", "checkpoint.save=false"]
    one = _run(tmp_path / "one", "checkpoint.save=false")
    proc = torchrun(2, [*sets, f"train.run_dir={tmp_path / 'two'}", *layout], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["moe_expert_fraction"] == a["moe_expert_fraction"]
        assert b["moe_load_ratio"] == pytest.approx(a["moe_load_ratio"], rel=1e-9)
        assert b["moe_aux_loss"] == pytest.approx(a["moe_aux_loss"], rel=1e-6)
        assert b["moe_z_loss"] == pytest.approx(a["moe_z_loss"], rel=1e-6)


def write_zipf_corpus(prefix: Path, documents: int = 400, seed: int = 0) -> Path:
    """Documents of Zipf-distributed tokens (exponent 1.5: the most frequent token is about 40% of all):
    routing by token decides most of an expert's load, so without a balancing force whole experts go
    idle."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(documents):
        doc = np.minimum(rng.zipf(1.5, size=rng.integers(40, 200)), VOCAB - 12) + 3
        builder.add_document(np.append(doc, 2).astype(np.uint16), [len(doc) + 1])
    builder.finalize(f"{prefix}.idx")
    return prefix


def load_ratio(rows: list[dict], last: int = 20) -> float:
    """Max/min expert load of the worst MoE block over the last ``last`` logged steps (every step
    routes the same number of slots, so the mean of the fractions is the fraction of their sum); inf
    when an expert got nothing."""
    fractions = np.array([r["moe_expert_fraction"] for r in rows[-last:]]).mean(0)  # [blocks, experts]
    low = fractions.min(1)
    return float("inf") if (low == 0).any() else float((fractions.max(1) / low).max())


@pytest.mark.slow
def test_load_balancing_loss_balances_the_experts(tmp_path):
    """Acceptance 4: 200 steps of moe-tiny on Zipf tokens, aux_loss_coeff 0 vs 0.01 (same seed, data
    and everything else): without the loss an expert of some block goes idle (max/min load over the last
    20 steps infinite), with it every expert keeps a share (figures in BENCHMARKS.md)."""
    corpus = write_zipf_corpus(tmp_path / "data" / "zipf")
    common = (
        *(f"data.train={corpus}", "data.mock=false", 'data.split="100,0,0"', f"model.vocab_size={VOCAB}"),
        *("train.micro_batch_size=4", "train.global_batch_size=4", "optim.lr=0.01", "optim.min_lr=0.01"),
        "checkpoint.save=false",
    )
    ratios = {}
    for coeff in ("0", "0.01"):
        rows = _run(tmp_path / f"aux{coeff}", *common, f"model.moe.aux_loss_coeff={coeff}", steps=200)
        assert len(rows) == 200
        ratios[coeff] = load_ratio(rows)
        shares = np.array([r["moe_expert_fraction"] for r in rows[-20:]]).mean(0).round(3).tolist()
        print(f"aux {coeff}: expert fractions per block over steps 181-200 {shares}")
    print(f"max/min expert load over steps 181-200: aux 0 {ratios['0']:.2f}, aux 0.01 {ratios['0.01']:.2f}")
    assert ratios["0.01"] < 4, ratios
    assert ratios["0"] > 3 * ratios["0.01"], ratios
