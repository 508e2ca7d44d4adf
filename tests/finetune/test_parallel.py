"""Fine-tuning at parallel layouts the end-to-end tests do not reach, each checked against a run that fixes
the answer (same config, data and initial weights in one process):

- ZeRO-2/3 at data parallel 2 with frozen parameters (freeze_embeddings + freeze_layers; LoRA with its
  base frozen), ZeRO-3 really partitioning (stage3_param_persistence_threshold=0): per-step and
  validation losses and the parameter counts match, frozen weights come out bitwise unchanged, trainable
  ones moved and equal the single process's, and RUN_DIR/best and the HF export carry them;
- SFT at pipeline parallel 2 (packed examples, loss on assistant tokens only; tied or untied embeddings)
  and tied embeddings at ZeRO-3: per-step and validation losses match pipeline = 1;
- LoRA dropout at tensor parallel 2: one mask over the full adapter input (LoRADropout), so with one seed
  the TP=2 forward, loss and LoRA gradients equal TP=1's, eval mode drops nothing, and a TP=2 training run
  with dropout reproduces the TP=1 run's losses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.finetune.helpers import (
    SFT_TINY,
    export,
    reader_weights,
    reverse_rows,
    reverse_split,
    write_jsonl,
)
from tests.training.helpers import assert_close_rel, losses, rows, single, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODULE = "bigtrain.finetune"
TIMEOUT = 240  # per launched job


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ft_parallel_data")
    train, held_out = reverse_split(64, 16)
    return (
        write_jsonl(root / "train.jsonl", reverse_rows(train)),
        write_jsonl(root / "valid.jsonl", reverse_rows(held_out)),
    )


def sft_args(tok_dir: Path, data: tuple[Path, Path], run_dir: Path, *overrides: str) -> list[str]:
    """sft-tiny on the reversal data: 64 examples packed ~4 to a sequence, micro-batches of 2 (4 per
    global batch of 8: gradient accumulation, or 4 pipeline micro-batches)."""
    return ["--config", SFT_TINY, "--set", f"data.tokenizer={tok_dir}", f"finetune.train={data[0]}",
            f"finetune.valid={data[1]}", f"train.run_dir={run_dir}", "train.log_interval=1",
            "train.micro_batch_size=2", *overrides]  # fmt: skip


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in rows(run_dir) if "val_loss" in r}


def assert_same_training(run_dir: Path, ref_dir: Path, rel: float) -> None:
    assert_close_rel(losses(run_dir), losses(ref_dir), rel)
    got, want = val_losses(run_dir), val_losses(ref_dir)
    assert want and got.keys() == want.keys(), (got, want)
    assert_close_rel([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rel)


# ---------------------------------------------------------------------------- ZeRO-2/3 with frozen parameters
FROZEN_MODES = {
    "freeze": ["finetune.freeze_embeddings=true", "finetune.freeze_layers=1"],
    "lora": ["finetune.lora.rank=4", "finetune.lora.alpha=8"],
}


def is_frozen(mode: str, key: str) -> bool:
    """Layout keys: 0 the embedding, 1..2 the blocks, 3 the final norm, 4 the output layer."""
    return "lora_" not in key if mode == "lora" else int(key.split(".")[0]) <= 1


def hf_is_frozen(mode: str, name: str) -> bool:
    """HF tensors that must equal the base model's: LoRA merges into the projections only."""
    if mode == "lora":
        return "_proj" not in name
    return name.startswith(("model.embed_tokens.", "model.layers.0."))


def zero_args(tok_dir, data, run_dir: Path, base: Path, mode: str, *overrides: str) -> list[str]:
    return sft_args(tok_dir, data, run_dir, f"checkpoint.load={base}", "train.steps=3", "train.eval_interval=0",
                    "optim.warmup_steps=0", *FROZEN_MODES[mode], *overrides)  # fmt: skip


@pytest.fixture(scope="module")
def zero_reference(tok_dir, hf_base, sft_data, tmp_path_factory):
    """mode -> run directory of the single-process run (no ZeRO) of that mode, with its HF export."""
    runs: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in runs:
            run_dir = tmp_path_factory.mktemp(f"zero_reference_{mode}")
            single(zero_args(tok_dir, sft_data, run_dir, hf_base[1], mode), module=MODULE, timeout=TIMEOUT)
            export(run_dir / "checkpoints", run_dir / "hf")
            runs[mode] = run_dir
        return runs[mode]

    return get


def initial_weights(base: Path, run_ckpt: Path) -> dict[str, torch.Tensor]:
    """The weights a run started from: the base checkpoint's, and the fresh init of what fine-tuning adds."""
    from bigtrain.checkpoint import WeightReader
    from bigtrain.config import config_from_dict
    from bigtrain.finetune.params import task_params
    from bigtrain.models import layout

    cfg = config_from_dict(WeightReader(run_ckpt).meta["config"])
    start = reader_weights(base)
    for lp in layout.iter_layer_params(cfg.model, task=task_params(cfg)):
        if lp.key not in start:
            start[lp.key] = layout.init_full(
                lp.spec, lp.index, cfg.model, cfg.derived.padded_vocab_size, cfg.train.seed
            )
    return start


@pytest.mark.parametrize("mode", sorted(FROZEN_MODES))
@pytest.mark.parametrize("stage", [2, 3])
def test_frozen_parameters_under_zero(stage, mode, tok_dir, hf_base, sft_data, zero_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, base = hf_base
    ref = zero_reference(mode)
    run_dir = tmp_path / "run"
    zero = [f"zero.stage={stage}", "zero.stage3_param_persistence_threshold=0"]  # ZeRO-3: partition all
    torchrun(2, zero_args(tok_dir, sft_data, run_dir, base, mode, *zero), module=MODULE, timeout=TIMEOUT)

    # trains like the single process (per-step losses; validation after the last step)
    assert_same_training(run_dir, ref, 1e-5)
    counts = next(r for r in rows(run_dir) if "trainable_params" in r)
    ref_counts = next(r for r in rows(ref) if "trainable_params" in r)
    assert counts["frozen_params"] > 0 and counts["trainable_params"] > 0
    assert (counts["trainable_params"], counts["frozen_params"]) == (
        ref_counts["trainable_params"],
        ref_counts["frozen_params"],
    ), "parameter counts must be of whole parameters (ZeRO-3 leaves p.numel() == 0)"

    start, expected = initial_weights(base, run_dir / "checkpoints"), reader_weights(ref / "checkpoints")
    after, best = reader_weights(run_dir / "checkpoints"), reader_weights(run_dir / "best")
    # ZeRO-3 keeps no fp32 master of a frozen parameter: the checkpoint must gather it, not save the
    # rank's empty partition
    assert not [k for k, v in after.items() if v.numel() == 0]
    assert after.keys() == expected.keys() == best.keys()
    frozen = [k for k in after if is_frozen(mode, k)]
    assert frozen and len(frozen) < len(after)
    worst = 0.0
    for key, value in after.items():
        assert value.shape == expected[key].shape, key
        assert torch.equal(best[key], value), f"RUN_DIR/best differs from the last checkpoint: {key}"
        if key in frozen:  # (vocab-padding rows compared too: they never change)
            assert torch.equal(value, start[key]), f"frozen {key} changed"
        else:
            assert not torch.equal(value, start[key]), f"trainable {key} did not move"
        worst = max(worst, (value - expected[key]).abs().max().item())
    print(f"zero {stage} {mode}: max |weight - single-process weight| {worst:.2e}")
    assert worst <= 1e-5

    # HF export: frozen tensors exactly the base model's, all equal to the single-process run's export
    exported = AutoModelForCausalLM.from_pretrained(
        export(run_dir / "checkpoints", tmp_path / "hf")
    ).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(ref / "hf").state_dict()
    original = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    assert exported.keys() == original.keys()
    for name, value in exported.items():
        if hf_is_frozen(mode, name):
            assert torch.equal(value, original[name]), f"exported {name} is not the base model's"
        else:
            assert not torch.equal(value, original[name]), f"exported {name} did not change"
        assert (value - reference[name]).abs().max() <= 1e-5, name
    assert sum(hf_is_frozen(mode, n) for n in exported) not in (0, len(exported))


# ---------------------------------------------------------------------------- layouts vs pipeline = 1
@pytest.fixture(scope="module")
def sft_reference(tok_dir, sft_data, tmp_path_factory):
    """tie_embeddings -> the single-process SFT run (fresh init, 5 steps, validation at 2, 4, 5)."""
    runs: dict[bool, tuple[Path, str]] = {}

    def get(tied: bool) -> tuple[Path, str]:
        if tied not in runs:
            run_dir = tmp_path_factory.mktemp(f"sft_reference_tied{int(tied)}")
            proc = single(layout_args(tok_dir, sft_data, run_dir, tied), module=MODULE, timeout=TIMEOUT)
            runs[tied] = run_dir, proc.stdout
        return runs[tied]

    return get


def layout_args(tok_dir, data, run_dir: Path, tied: bool, *overrides: str) -> list[str]:
    return sft_args(tok_dir, data, run_dir, "train.steps=5", "train.eval_interval=2", "checkpoint.save=false",
                    f"model.tie_embeddings={str(tied).lower()}", *overrides)  # fmt: skip


LAYOUTS = {
    "pp2": (False, ["parallel.pipeline=2"]),
    "pp2-tied": (True, ["parallel.pipeline=2"]),  # the tied embedding lives on both stages
    # ZeRO-3 gathers the tied weight for the output layer too (validation calls the module directly)
    "dp2-zero3-tied": (True, ["zero.stage=3", "zero.stage3_param_persistence_threshold=0"]),
    # context parallel: each rank half of every packed sequence (its positions; doc ids whole), the
    # validation loss summed over both halves
    "cp2": (False, ["parallel.context=2"]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sft_layout_matches_single_process(name, tok_dir, sft_data, sft_reference, tmp_path):
    tied, overrides = LAYOUTS[name]
    ref, ref_stdout = sft_reference(tied)
    sequences = int(re.search(r"sft: (\d+) training sequences", ref_stdout).group(1))
    assert 8 <= sequences <= 64 // 3  # several examples (attention and positions per example) per sequence
    torchrun(2, layout_args(tok_dir, sft_data, tmp_path, tied, *overrides), module=MODULE, timeout=TIMEOUT)
    assert_same_training(tmp_path, ref, 1e-5)
    assert sorted(val_losses(tmp_path)) == [2, 4, 5]
    values = losses(ref)
    assert len(values) == 5 and values[-1] < values[0] - 0.2, f"training must move the loss: {values}"


# ---------------------------------------------------------------------------- LoRA dropout at TP=2
def test_lora_dropout_tp2_forward_and_gradients_equal_tp1(tmp_path: Path):
    """tests/finetune/lora_probe.py at TP=1 and TP=2 (every LoRA target: column-parallel qkv and gate_up
    with a replicated input, row-parallel proj and down with a sharded one), dropout 0.3."""
    out = {}
    for tp in (1, 2):
        torchrun(
            tp,
            ["--output", str(tmp_path / f"tp{tp}.pt")],
            module="tests.finetune.lora_probe",
            timeout=TIMEOUT,
        )
        out[tp] = torch.load(tmp_path / f"tp{tp}.pt")
    one, two = out[1], out[2]
    scale = one["train"].abs().max()
    # eval mode: no dropout (deterministic, no random numbers drawn), and the same model at both sizes
    for r in (one, two):
        assert torch.equal(r["eval"], r["eval_again"]) and not r["eval_used_rng"]
    assert (two["eval"] - one["eval"]).abs().max() <= 1e-5 * scale
    # train mode drops something (the seed decides what), identically at TP=2 and TP=1
    assert (one["train"] - one["eval"]).abs().max() > 0.05 * scale
    assert (one["train_other_seed"] - one["train"]).abs().max() > 0.05 * scale
    diffs = {
        "train": (two["train"] - one["train"]).abs().max() / scale,
        "other seed": (two["train_other_seed"] - one["train_other_seed"]).abs().max() / scale,
        "loss": (two["loss"] - one["loss"]).abs() / one["loss"].abs(),
    }
    grads = [k for k in one if k.startswith("grad.")]
    assert len(grads) == 2 * 4 * 2 and one.keys() == two.keys()
    for key in grads:
        diffs[key] = (two[key] - one[key]).abs().max() / one[key].abs().max()
    print("LoRA dropout TP=2 vs TP=1, max relative differences:")
    print("\n".join(f"  {k}: {float(v):.2e}" for k, v in diffs.items()))
    assert max(float(v) for k, v in diffs.items() if not k.startswith("grad.")) <= 1e-5
    assert max(float(diffs[k]) for k in grads) <= 5e-4


def test_lora_dropout_tp2_training_matches_tp1(tok_dir, hf_base, sft_data, tmp_path):
    """A TP=2 LoRA run with dropout trains exactly like TP=1: the ranks' masks stay in step with each
    other and with the single process over the steps (validation after the last step: no dropout)."""
    args = ["finetune.lora.rank=4", "finetune.lora.dropout=0.3", f"checkpoint.load={hf_base[1]}", "train.steps=4",
            "train.eval_interval=0", "optim.lr=0.01", "optim.warmup_steps=0", "checkpoint.save=false"]  # fmt: skip
    single(sft_args(tok_dir, sft_data, tmp_path / "tp1", *args), module=MODULE, timeout=TIMEOUT)
    torchrun(2, sft_args(tok_dir, sft_data, tmp_path / "tp2", *args, "parallel.tensor=2"), module=MODULE,
             timeout=TIMEOUT)  # fmt: skip
    values = losses(tmp_path / "tp1")
    print(f"LoRA dropout: TP=1 losses {values}\n              TP=2 losses {losses(tmp_path / 'tp2')}")
    assert_same_training(tmp_path / "tp2", tmp_path / "tp1", 1e-5)
    assert values[-1] < values[0] - 0.05, f"training must move the loss: {values}"
