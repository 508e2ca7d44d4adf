"""Fine-tuning MoE models (model.moe) end to end with the real entry point, from a MoE base pretrained
here: full SFT with the routers frozen, LoRA on the attention (experts and routers untouched) and
classification, judged by parameter deltas and losses; LoRA on the experts is refused by config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.finetune.conftest import VOCAB
from tests.finetune.helpers import (
    CLASSIFY_TINY,
    SFT_TINY,
    classify_rows,
    reader_weights,
    reverse_rows,
    reverse_split,
    write_jsonl,
)
from tests.training.helpers import assert_refused_before_start_up, rows, single

pytestmark = pytest.mark.timeout(420)
MODULE = "bigtrain.finetune"
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=64"]


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MoE decoder with the fine-tuning configs' shapes, pretrained 3 steps on mock data."""
    root = tmp_path_factory.mktemp("moe_base")
    single(
        ["--config", SFT_TINY, "--set", *MOE, f"model.vocab_size={VOCAB}", "finetune.task=none", "data.tokenizer=null",
         "data.mock=true", f"train.run_dir={root}", "train.steps=3", "train.eval_interval=0"],
    )  # fmt: skip
    return root / "checkpoints"


def _sft(tok_dir: Path, tmp_path: Path, base: Path, *extra: str) -> Path:
    train, _ = reverse_split(64, 0)
    write_jsonl(tmp_path / "train.jsonl", reverse_rows(train))
    run_dir = tmp_path / "run"
    single(
        ["--config", SFT_TINY, "--set", *MOE, f"data.tokenizer={tok_dir}", f"finetune.train={tmp_path / 'train.jsonl'}",
         f"train.run_dir={run_dir}", f"checkpoint.load={base}", "finetune.valid=null", "train.steps=6",
         "train.eval_interval=0", "train.log_interval=1", *extra],
        module=MODULE,
    )  # fmt: skip
    return run_dir


def test_sft_with_frozen_routers_trains_experts_only_around_them(
    tok_dir: Path, moe_base: Path, tmp_path: Path
):
    run_dir = _sft(tok_dir, tmp_path, moe_base, "finetune.freeze_router=true")
    losses = [r["loss"] for r in rows(run_dir) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    before, after = reader_weights(moe_base), reader_weights(run_dir / "checkpoints")
    routers = [k for k in before if k.endswith("mlp.router.weight")]
    experts = [k for k in before if ".mlp.experts." in k]
    assert len(routers) == 2 and len(experts) == 4  # 2 blocks: a router, gate_up and down each
    for key in routers:
        assert torch.equal(after[key], before[key]), f"{key} moved though finetune.freeze_router is set"
    for key in experts:
        assert not torch.equal(after[key], before[key]), f"{key} did not train"
    aux = [r for r in rows(run_dir) if "moe_aux_loss" in r]
    assert not aux or all(r["moe_aux_loss"] > 0 for r in aux)


def test_lora_on_attention_leaves_experts_and_routers_bitwise(tok_dir: Path, moe_base: Path, tmp_path: Path):
    run_dir = _sft(tok_dir, tmp_path, moe_base, "finetune.lora.rank=4", "finetune.lora.targets=[qkv,proj]")
    before, after = reader_weights(moe_base), reader_weights(run_dir / "checkpoints")
    lora = {k for k in after if "lora_" in k}
    assert len(lora) == 2 * 2 * 2  # A and B, 2 projections, 2 blocks
    for key, value in before.items():
        assert torch.equal(after[key], value), f"base weight {key} changed under LoRA"
    assert all(after[k].abs().sum() > 0 for k in lora if k.endswith("lora_B"))


def test_classification_on_a_moe_model_learns(tok_dir: Path, moe_base: Path, tmp_path: Path):
    write_jsonl(tmp_path / "train.jsonl", classify_rows(200, seed=0))
    write_jsonl(tmp_path / "valid.jsonl", classify_rows(40, seed=1))
    run_dir = tmp_path / "run"
    single(
        ["--config", CLASSIFY_TINY, "--set", *MOE, f"data.tokenizer={tok_dir}", f"finetune.train={tmp_path / 'train.jsonl'}",
         f"finetune.valid={tmp_path / 'valid.jsonl'}", f"train.run_dir={run_dir}", f"checkpoint.load={moe_base}",
         "train.steps=30", "train.eval_interval=30", "train.log_interval=1", "finetune.patience=0"],
        module=MODULE,
    )  # fmt: skip
    losses = [r["loss"] for r in rows(run_dir) if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    accuracy = [r["val_accuracy"] for r in rows(run_dir) if "val_accuracy" in r]
    print(f"MoE classification: loss {losses[0]:.3f} -> {losses[-1]:.3f}, val_accuracy {accuracy}")
    assert accuracy and accuracy[-1] >= 0.8


def test_lora_on_the_dense_mlp_targets_of_a_moe_model_is_refused(tok_dir: Path, tmp_path: Path):
    write_jsonl(tmp_path / "train.jsonl", reverse_rows(["abc"]))
    proc = single(
        ["--config", SFT_TINY, "--set", *MOE, f"data.tokenizer={tok_dir}", f"finetune.train={tmp_path / 'train.jsonl'}",
         f"train.run_dir={tmp_path / 'run'}", "finetune.lora.rank=4", "finetune.lora.targets=[qkv,gate_up]"],
        module=MODULE, check=False, no_start_up=True,
    )  # fmt: skip
    assert_refused_before_start_up(proc, "finetune.lora.targets ['gate_up']", "experts")
