"""The encoder pipeline end to end through the real entry points, as ``make demo-bert`` runs it: a corpus
with a learnable fill-in rule (tools/build_bert_demo_corpus.py) -> a tokenizer with BERT's specials ->
sentence-split data -> 2-process MLM + NSP pretraining (configs/bert-demo.yaml) -> the HF export, whose
``fill-mask`` pipeline predicts held-out masked words (sentence shapes never seen in training) with >= 90%
top-1 accuracy -> evaluation (the same metrics at TP1 and TP2) -> a classifier fine-tuned from the
encoder checkpoint, exported as ``BertForSequenceClassification``, >= 95% accurate on held-out sentences."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_cmd
from tests.training.helpers import single, torchrun, write_bert_corpus

pytestmark = pytest.mark.slow

DEMO = str(REPO / "configs" / "bert-demo.yaml")
CLASSIFY = str(REPO / "configs" / "bert-demo-classify.yaml")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(text dir, tokenizer dir, data prefix, run dir) of the demo's pretraining (2 processes)."""
    root = tmp_path_factory.mktemp("bert-demo")
    text, tok, prefix = write_bert_corpus(root, documents=1000)
    run = root / "run"
    torchrun(
        2,
        ["--config", DEMO, "--set", f"data.train={prefix}", f"data.tokenizer={tok}", f"train.run_dir={run}"],
        timeout=900,
    )
    return text, tok, prefix, run


def test_fill_mask_on_held_out_sentences(pretrained, tmp_path):
    from transformers import pipeline

    text, _, _, run = pretrained
    hf = tmp_path / "hf"
    run_cmd(
        [
            sys.executable,
            str(REPO / "tools" / "convert_to_hf.py"),
            "--checkpoint",
            str(run / "checkpoints"),
            "--output",
            str(hf),
        ]
    )
    fill = pipeline("fill-mask", model=str(hf))
    probes = [json.loads(line) for line in (text / "fill_mask.jsonl").read_text().splitlines()]
    assert len(probes) >= 50
    misses = [(p["text"], p["answer"], fill(p["text"], top_k=1)[0]["token_str"].strip()) for p in probes]
    misses = [m for m in misses if m[1] != m[2]]
    accuracy = 1 - len(misses) / len(probes)
    assert accuracy >= 0.9, f"fill-mask top-1 {accuracy:.1%}; misses {misses}"


def test_evaluation_is_layout_independent(pretrained):
    _, tok, prefix, run = pretrained
    args = [
        "--config",
        DEMO,
        "--data",
        str(prefix),
        "--set",
        f"data.tokenizer={tok}",
        f"train.run_dir={run}",
        "data.train_samples=96",
    ]
    one = json.loads(single(args, module="bigtrain.evaluate").stdout.strip().splitlines()[-1])
    two = json.loads(
        torchrun(2, [*args, "parallel.tensor=2"], module="bigtrain.evaluate").stdout.strip().splitlines()[-1]
    )
    assert one["samples"] == two["samples"] == 96 and one["predicted_tokens"] == two["predicted_tokens"] > 0
    for key in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    assert one["mlm_accuracy"] > 0.8 and one["nsp_accuracy"] > 0.7, one


def test_classifier_fine_tuned_from_the_encoder(pretrained, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    text, tok, _, run = pretrained
    ft = tmp_path / "classify"
    out = torchrun(
        2,
        [
            "--config",
            CLASSIFY,
            "--set",
            f"data.tokenizer={tok}",
            f"finetune.train={text / 'classify_train.jsonl'}",
            f"finetune.valid={text / 'classify_valid.jsonl'}",
            f"checkpoint.load={run / 'checkpoints'}",
            f"train.run_dir={ft}",
        ],
        module="bigtrain.finetune",
        timeout=600,
    )
    assert "loaded weights from" in out.stdout
    hf = tmp_path / "hf"
    run_cmd(
        [
            sys.executable,
            str(REPO / "tools" / "convert_to_hf.py"),
            "--checkpoint",
            str(ft / "checkpoints"),
            "--output",
            str(hf),
        ]
    )
    model = AutoModelForSequenceClassification.from_pretrained(str(hf)).eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    rows = [json.loads(line) for line in (text / "classify_valid.jsonl").read_text().splitlines()]
    with torch.no_grad():
        logits = model(**tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")).logits
    predicted = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy >= 0.95, accuracy
