"""Fine-tuning end to end with the real entry point: SFT on a task the model cannot solve before, judged
through the exported HF model's generate (acceptance 2); classification at TP=2 with metrics, early
stopping, best checkpoint and LlamaForSequenceClassification export (3, 5); LoRA at TP=2 with a frozen
base and merged/PEFT exports (4); freezing and layer-wise LR decay by parameter deltas (5)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import VENV_BIN, run_with_port
from tests.finetune.conftest import VOCAB
from tests.finetune.helpers import (
    CLASSIFY_TINY,
    SFT_TINY,
    classify_rows,
    export,
    reader_weights,
    reverse_rows,
    reverse_split,
    write_jsonl,
)
from tests.training.helpers import rows, single, torchrun

pytestmark = pytest.mark.timeout(420)
MODULE = "bigtrain.finetune"


def test_sft_learns_reversal_measured_through_hf_generate(tok_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, held_out = reverse_split(400, 60)
    write_jsonl(tmp_path / "train.jsonl", reverse_rows(train))
    write_jsonl(tmp_path / "valid.jsonl", reverse_rows(held_out[:20]))
    run_dir = tmp_path / "run"
    proc = single(
        ["--config", SFT_TINY, "--set", f"data.tokenizer={tok_dir}", f"finetune.train={tmp_path / 'train.jsonl'}",
         f"finetune.valid={tmp_path / 'valid.jsonl'}", f"train.run_dir={run_dir}", "finetune.epochs=16",
         "train.eval_interval=0", "train.log_interval=50"],
        module=MODULE,
    )  # fmt: skip
    sequences = int(proc.stdout.split("sft: ")[1].split()[0])
    assert sequences <= 110  # 400 examples of ~14 tokens, packed ~4 to a 64-token sequence
    assert [r["step"] for r in rows(run_dir) if "loss" in r][-1] == math.ceil(16 * sequences / 8)  # epochs
    hf = export(run_dir / "checkpoints", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(hf)  # the chat template travelled with the export
    model = AutoModelForCausalLM.from_pretrained(hf).eval()

    stopped = 0

    def exact_match(words: list[str]) -> float:
        nonlocal stopped
        hits = 0
        for row in reverse_rows(words):
            ids = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                          return_tensors="pt")["input_ids"]  # fmt: skip
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            stopped += out[0, -1].item() == tok.eos_token_id  # it learned to end its reply
            hits += (
                " ".join(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split())
                == row["response"]
            )
        return hits / len(words)

    score = exact_match(held_out)
    print(
        f"held-out exact match through HF generate: {score:.1%} of {len(held_out)}, {stopped} ended with EOS"
    )
    assert score >= 0.95 and stopped >= 0.95 * len(held_out)


def hf_predictions(valid: list[dict], hf: Path) -> list[int]:
    """Class ids the exported LlamaForSequenceClassification predicts (right-padded batch)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    assert model.config.id2label == {0: "food", 1: "sport", 2: "tech"}
    enc = tok([r["text"] for r in valid], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.argmax(-1).tolist()


def confusion(preds: list[int], truth: list[int]) -> list[list[int]]:
    y = torch.tensor(truth)
    return (
        torch.zeros(3, 3, dtype=torch.long)
        .index_put_((y, torch.tensor(preds)), torch.ones_like(y), accumulate=True)
        .tolist()
    )


def test_classification_tp2_metrics_early_stop_best_and_export(tok_dir: Path, tmp_path: Path):
    write_jsonl(tmp_path / "train.jsonl", classify_rows(300, seed=1))
    valid = classify_rows(100, seed=2)
    write_jsonl(tmp_path / "valid.jsonl", valid)
    run_dir = tmp_path / "run"
    torchrun(
        2,
        ["--config", CLASSIFY_TINY, "--set", f"data.tokenizer={tok_dir}", "parallel.tensor=2",
         f"finetune.train={tmp_path / 'train.jsonl'}", f"finetune.valid={tmp_path / 'valid.jsonl'}",
         f"train.run_dir={run_dir}", "train.steps=200", "finetune.patience=2"],
        module=MODULE,
    )  # fmt: skip
    vals = [r for r in rows(run_dir) if "val_accuracy" in r]
    # early stopping: the run ends at the 2nd validation without a gain over the best accuracy
    best, bad, expected = -1.0, 0, None
    for r in vals:
        best, bad = (r["val_accuracy"], 0) if r["val_accuracy"] > best else (best, bad + 1)
        if bad == 2:
            expected = r["step"]
            break
    last_step = max(r["step"] for r in rows(run_dir) if "loss" in r)
    assert expected is not None and last_step == expected < 200
    assert (run_dir / "checkpoints" / f"step_{expected:08d}").is_dir()
    best_row = max(vals, key=lambda r: (r["val_accuracy"], -r["step"]))
    assert json.loads((run_dir / "best" / "bigtrain.json").read_text())["step"] == best_row["step"]

    truth = [{"food": 0, "sport": 1, "tech": 2}[r["label"]] for r in valid]
    best_preds = hf_predictions(valid, export(run_dir / "best", tmp_path / "hf_best"))
    accuracy = sum(p == t for p, t in zip(best_preds, truth)) / len(truth)
    print(f"best checkpoint (step {best_row['step']}): held-out accuracy through HF {accuracy:.1%}")
    assert accuracy >= 0.95 and accuracy == best_row["val_accuracy"]
    # the final checkpoint: the logged metrics equal an independent computation from HF's predictions
    final = next(r for r in vals if r["step"] == last_step)
    preds = torch.tensor(hf_predictions(valid, export(run_dir / "checkpoints", tmp_path / "hf_final")))
    y = torch.tensor(truth)
    tp = torch.stack([((preds == c) & (y == c)).sum() for c in range(3)]).double()
    precision = torch.nan_to_num(tp / torch.stack([(preds == c).sum() for c in range(3)]))
    recall = tp / torch.stack([(y == c).sum() for c in range(3)])
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall))
    confusion = torch.zeros(3, 3, dtype=torch.long).index_put_(
        (y, preds), torch.ones_like(y), accumulate=True
    )
    assert final["val_confusion"] == confusion.tolist()
    assert final["val_accuracy"] == pytest.approx(float((preds == y).double().mean()), abs=1e-12)
    for name, value in (("val_precision", precision), ("val_recall", recall), ("val_f1", f1)):
        assert final[name] == pytest.approx(float(value.mean()), abs=1e-12), name

    # patience survives a crash: killed right after the first validation without a gain (its checkpoint
    # holds that count), the relaunch stops at the same step as the uninterrupted run
    crash_dir = tmp_path / "crash"
    common = ["--config", CLASSIFY_TINY, "--set", f"data.tokenizer={tok_dir}", "parallel.tensor=2",
              f"finetune.train={tmp_path / 'train.jsonl'}", f"finetune.valid={tmp_path / 'valid.jsonl'}",
              f"train.run_dir={crash_dir}", "train.steps=200", "finetune.patience=2", "checkpoint.interval=10"]  # fmt: skip
    crashed = torchrun(2, [*common, f"debug.crash_at_step={expected - 10}"], module=MODULE, check=False)
    assert crashed.returncode != 0
    torchrun(2, common, module=MODULE)
    resumed_vals = [r for r in rows(crash_dir) if "val_accuracy" in r]
    assert [r["val_accuracy"] for r in resumed_vals] == [r["val_accuracy"] for r in vals]
    assert max(r["step"] for r in rows(crash_dir) if "loss" in r) == expected


def test_lora_tp2_frozen_base_and_merged_and_peft_exports(tok_dir: Path, hf_base, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir, base_ckpt = hf_base
    train, held_out = reverse_split(200, 20)
    write_jsonl(tmp_path / "train.jsonl", reverse_rows(train))
    run_dir = tmp_path / "run"
    torchrun(
        2,
        ["--config", SFT_TINY, "--set", f"data.tokenizer={tok_dir}", "parallel.tensor=2",
         f"finetune.train={tmp_path / 'train.jsonl'}", f"train.run_dir={run_dir}", f"checkpoint.load={base_ckpt}",
         "finetune.valid=null", "finetune.lora.rank=4", "finetune.lora.alpha=8", "train.steps=12", "train.eval_interval=0"],
        module=MODULE,
    )  # fmt: skip
    params = next(r for r in rows(run_dir) if "trainable_params" in r)
    assert 0 < params["trainable_params"] < 0.1 * (params["trainable_params"] + params["frozen_params"])
    before, after = reader_weights(base_ckpt), reader_weights(run_dir / "checkpoints")
    lora = {k for k in after if "lora_" in k}
    assert len(lora) == 2 * 4 * 2  # A and B, 4 projections, 2 blocks; replicas agreed across TP ranks
    for key, value in before.items():  # (vocab padding differs between TP=1 and TP=2: true rows compared)
        assert torch.equal(after[key][:VOCAB], value[:VOCAB]), f"base weight {key} changed"
    assert all(after[k].abs().sum() > 0 for k in lora if k.endswith("lora_B"))  # the adapters trained
    tokens = [1, 5, 17, 271, 268, 266, 17, 6, 17, 274]
    probe = tmp_path / "bigtrain_logits.pt"
    torchrun(2, ["--checkpoint", str(run_dir / "checkpoints"), "--tokens", ",".join(map(str, tokens)),
                 "--output", str(probe)], module="tests.finetune.logits_probe")  # fmt: skip
    ours = torch.load(probe)
    merged = AutoModelForCausalLM.from_pretrained(export(run_dir / "checkpoints", tmp_path / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(
        export(run_dir / "checkpoints", tmp_path / "base", "--peft-adapter", str(tmp_path / "adapter"))
    ).eval()
    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in base.state_dict().items())
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        merged_logits, peft_logits, original_logits = (
            merged(ids).logits,
            peft(ids).logits,
            original(ids).logits,
        )
    diffs = [(merged_logits - ours).abs().max().item(), (peft_logits - ours).abs().max().item()]
    print(f"LoRA TP=2: max |logit diff| merged {diffs[0]:.2e}, PEFT {diffs[1]:.2e}")
    assert max(diffs) <= 1e-4
    assert (original_logits - ours).abs().max() > 1e-2  # the adapters matter


def test_freezing_and_layer_wise_lr_by_parameter_deltas(tok_dir: Path, hf_base, tmp_path: Path):
    _, base_ckpt = hf_base
    train, _ = reverse_split(64, 0)
    write_jsonl(tmp_path / "train.jsonl", reverse_rows(train))
    run_dir = tmp_path / "run"
    lr = 1e-3
    single(
        ["--config", SFT_TINY, "--set", f"data.tokenizer={tok_dir}", f"finetune.train={tmp_path / 'train.jsonl'}",
         f"train.run_dir={run_dir}", f"checkpoint.load={base_ckpt}", "train.steps=1", "optim.name=adam",
         f"optim.lr={lr}", "optim.warmup_steps=0", "optim.decay=constant", "optim.weight_decay=0", "optim.grad_clip=0",
         "optim.layer_decay=0.5", "finetune.valid=null", "finetune.freeze_embeddings=true", "finetune.freeze_layers=1"],
        module=MODULE,
    )  # fmt: skip
    before, after = reader_weights(base_ckpt), reader_weights(run_dir / "checkpoints")
    for key in before:
        delta = (after[key] - before[key]).abs()
        index = int(key.split(".")[0])
        if index <= 1:  # embedding and the first block: frozen
            assert torch.equal(after[key], before[key]), key
        else:  # Adam's first step moves every element with a gradient by ~lr (its own layer's lr)
            expected = lr * 0.5 ** (1 if index == 2 else 0)
            moved = delta[delta > 0]
            assert moved.median().item() == pytest.approx(expected, rel=0.02), key


def test_lora_classification_pp2_metrics_match_export(tok_dir: Path, hf_base, tmp_path: Path):
    """Launched with ``deepspeed launch/finetune.sh``. Pipeline stages pass (hidden, positions, doc ids); validation statistics come from the last stage;
    LoRA adapters and the new score head live on different stages and export merged."""
    write_jsonl(tmp_path / "train.jsonl", classify_rows(200, seed=1))
    valid = classify_rows(60, seed=2)
    write_jsonl(tmp_path / "valid.jsonl", valid)
    run_dir = tmp_path / "run"
    args = ["--config", CLASSIFY_TINY, "--set", f"data.tokenizer={tok_dir}", "parallel.pipeline=2",
            f"finetune.train={tmp_path / 'train.jsonl'}", f"finetune.valid={tmp_path / 'valid.jsonl'}",
            f"train.run_dir={run_dir}", f"checkpoint.load={hf_base[1]}", "finetune.lora.rank=4", "train.steps=16",
            "optim.lr=0.01", "train.eval_interval=0"]  # fmt: skip
    # through the DeepSpeed launcher and the bash/Python launch/finetune.sh
    deepspeed = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2"]
    run_with_port(
        lambda port: [*deepspeed, "--master_port", str(port), "launch/finetune.sh", *args], timeout=300
    )
    logged = [r for r in rows(run_dir) if "val_accuracy" in r][-1]
    preds = hf_predictions(valid, export(run_dir / "checkpoints", tmp_path / "hf"))
    truth = [{"food": 0, "sport": 1, "tech": 2}[r["label"]] for r in valid]
    assert logged["val_confusion"] == confusion(preds, truth) and logged["val_examples"] == 60
