"""The bert family's fine-tuning end to end through ``python -m bigtrain.finetune`` on a tiny encoder
(random init, configs/bert-classify-tiny.yaml): sentence-pair classification learns a marker task to
high held-out accuracy (confusion matrix, best checkpoint); token classification reports token accuracy
and entity-level (and per-type) F1; both exports (tools/convert_to_hf.py) load as transformers'
BertFor{Sequence,Token}Classification and score the held-out data as the last validation did; data, tensor (LoRA) and pipeline parallel 2 reproduce the single
process's losses, and a TP2 LoRA checkpoint's merged and PEFT exports give its logits; fine-tuning from a
weights-only bert base checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.finetune.helpers import LETTERS, MARKERS, export, reader_weights, write_jsonl
from tests.finetune.test_bert_units import make_bert_tokenizer
from tests.training.helpers import assert_close_rel, losses, rows, single, torchrun

pytestmark = pytest.mark.timeout(420)
MODULE = "bigtrain.finetune"
BERT_TINY = str(REPO / "configs" / "bert-classify-tiny.yaml")
ENTITY = {"k": "PER", "p": "LOC"}  # token_classify: a word starting with the letter opens an entity


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_tokenizer(tmp_path_factory.mktemp("bert_tok"))


def pair_rows(n: int, seed: int) -> list[dict]:
    """Two letter texts; the one marker letter, somewhere in the second, decides the label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 4)))
        second = [rng.choice(LETTERS) for _ in range(rng.randint(2, 4))]
        marker = rng.choice(sorted(MARKERS))
        second.insert(rng.randint(0, len(second)), marker)
        out.append({"text": first, "text_pair": " ".join(second), "label": MARKERS[marker]})
    return out


def tag_rows(n: int, seed: int) -> list[dict]:
    """Words of letters; a word starting with k (PER) or p (LOC) opens an entity that the next word
    continues when it starts with m (I-): so tags need the word and its left neighbour."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags, length = [], [], rng.randint(4, 7)
        while len(words) < length:
            if rng.random() < 0.35:
                opener = rng.choice(sorted(ENTITY))
                words.append(opener + "".join(rng.choice(LETTERS) for _ in range(rng.randint(0, 1))))
                tags.append(f"B-{ENTITY[opener]}")
                if rng.random() < 0.5:
                    words.append("m" + rng.choice(LETTERS))
                    tags.append(f"I-{ENTITY[opener]}")
            else:
                words.append("".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 2))))
                tags.append("O")
        out.append({"tokens": words, "tags": tags})
    return out


def run_args(tok: Path, train: Path, valid: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["--config", BERT_TINY, "--set", f"data.tokenizer={tok}", f"finetune.train={train}",
            f"finetune.valid={valid}", f"train.run_dir={run_dir}", *overrides]  # fmt: skip


def validations(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "val_loss" in r]


def test_pair_classification_learns_the_marker(bert_tok: Path, tmp_path: Path):
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(240, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", pair_rows(60, 1))
    run_dir = tmp_path / "run"
    proc = single(
        run_args(bert_tok, train, valid, run_dir, "train.steps=100", "checkpoint.save=true"), module=MODULE
    )
    assert "classify: 240 training examples, labels ['food', 'sport', 'tech']" in proc.stdout
    last = validations(run_dir)[-1]
    assert last["val_examples"] == 60 and sum(map(sum, last["val_confusion"])) == 60
    assert last["val_accuracy"] >= 0.95, last
    assert (run_dir / "best" / "bigtrain.json").is_file()
    # the export (tools/convert_to_hf.py) is a BertForSequenceClassification that, given the exported
    # tokenizer's own pair encoding, predicts what the last validation counted
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = export(run_dir / "checkpoints", tmp_path / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    assert type(model).__name__ == "BertForSequenceClassification"
    tok = AutoTokenizer.from_pretrained(hf)
    rows_ = [json.loads(line) for line in valid.read_text().splitlines()]
    enc = tok([r["text"] for r in rows_], [r["text_pair"] for r in rows_], padding=True, return_tensors="pt")
    with torch.no_grad():
        preds = model(**enc).logits.argmax(-1).tolist()
    confusion = [[0] * 3 for _ in range(3)]
    for r, p in zip(rows_, preds):
        confusion[model.config.label2id[r["label"]]][p] += 1
    assert confusion == last["val_confusion"]


def test_token_classification_reports_entity_f1(bert_tok: Path, tmp_path: Path):
    train = write_jsonl(tmp_path / "train.jsonl", tag_rows(240, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", tag_rows(60, 1))
    run_dir = tmp_path / "run"
    proc = single(
        run_args(bert_tok, train, valid, run_dir, "finetune.task=token_classify", "finetune.metric=val_f1",
                 "train.steps=150", "finetune.patience=0", "optim.lr=3e-3", "train.eval_interval=50"),
        module=MODULE,
    )  # fmt: skip
    assert "tags ['O', 'B-LOC', 'I-LOC', 'B-PER', 'I-PER']" in proc.stdout
    assert "val_PER_f1" in proc.stdout and "val_LOC_f1" in proc.stdout  # the validation log line
    last = validations(run_dir)[-1]
    assert last["val_examples"] == 60 and last["val_entities"] > 30
    assert last["val_PER_support"] + last["val_LOC_support"] == last["val_entities"]
    p, r = last["val_precision"], last["val_recall"]
    assert last["val_f1"] == pytest.approx(2 * p * r / (p + r))
    assert last["val_accuracy"] >= 0.95 and last["val_f1"] >= 0.85, last
    # the export: a BertForTokenClassification whose first-piece predictions (the exported tokenizer's
    # word_ids) score what the last validation did
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from bigtrain.metrics import entity_scores

    hf = export(run_dir / "checkpoints", tmp_path / "hf")
    model = AutoModelForTokenClassification.from_pretrained(hf).eval()
    assert type(model).__name__ == "BertForTokenClassification"
    tok = AutoTokenizer.from_pretrained(hf)
    true, pred = [], []
    for r in (json.loads(line) for line in valid.read_text().splitlines()):
        enc = tok(r["tokens"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            ids = model(**enc).logits[0].argmax(-1).tolist()
        words = enc.word_ids()
        firsts = [i for i, w in enumerate(words) if w is not None and (i == 0 or words[i - 1] != w)]
        true.append(r["tags"])
        pred.append([model.config.id2label[ids[i]] for i in firsts])
    hits = sum(t == p for ts, ps in zip(true, pred) for t, p in zip(ts, ps))
    assert hits / sum(map(len, true)) == pytest.approx(last["val_accuracy"])
    assert entity_scores(true, pred)["micro"]["f1"] == pytest.approx(last["val_f1"])


LAYOUTS = {  # two processes: data parallel, tensor parallel (LoRA on every projection), pipeline parallel
    "dp2": [],
    "tp2_lora": ["parallel.tensor=2", "finetune.lora.rank=4", "finetune.lora.alpha=8", "optim.lr=1e-2"],
    "pp2": ["parallel.pipeline=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "layout"),
    [("classify", "dp2"), ("token_classify", "dp2"), ("token_classify", "tp2_lora"), ("classify", "pp2")],
)
def test_two_processes_equal_one(bert_tok: Path, tmp_path: Path, task: str, layout: str):
    data = pair_rows if task == "classify" else tag_rows
    train = write_jsonl(tmp_path / "train.jsonl", data(64, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", data(20, 1))
    common = [f"finetune.task={task}", "train.steps=4", "train.eval_interval=2", "train.log_interval=1",
              "train.micro_batch_size=4", "finetune.patience=0"]  # fmt: skip
    extra = LAYOUTS[layout]
    single_extra = [x for x in extra if not x.startswith("parallel.")]
    single(run_args(bert_tok, train, valid, tmp_path / "one", *common, *single_extra), module=MODULE)
    torchrun(
        2, run_args(bert_tok, train, valid, tmp_path / "two", *common, *extra), module=MODULE, timeout=300
    )
    assert len(losses(tmp_path / "one")) == 4
    assert_close_rel(losses(tmp_path / "two"), losses(tmp_path / "one"), 1e-5)
    one, two = validations(tmp_path / "one"), validations(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [2, 4]
    assert_close_rel([r["val_loss"] for r in two], [r["val_loss"] for r in one], 1e-5)
    assert [r["val_accuracy"] for r in two] == [r["val_accuracy"] for r in one]
    if layout == "tp2_lora":
        assert_hf_exports_match(tmp_path / "two", tmp_path / "hf")


def assert_hf_exports_match(run_dir: Path, out: Path) -> None:
    """A token-classification LoRA checkpoint (tensor parallel 2): the TP1 model loaded from it, the
    export's tensors with LoRA merged in a BertForTokenClassification, and the unmerged base plus the
    PEFT adapter export give the same logits."""
    from peft import PeftModel
    from transformers import BertConfig, BertForTokenClassification

    from bigtrain.checkpoint import WeightReader, load_weights_only
    from bigtrain.config import config_from_dict
    from bigtrain.finetune.export import hf_tensor_groups, write_peft_adapter
    from bigtrain.registry import build_model

    reader = WeightReader(run_dir / "checkpoints")
    saved = config_from_dict(reader.meta["config"])
    cfg = config_from_dict(reader.meta["config"])
    cfg.parallel.tensor, cfg.checkpoint.load = 1, None
    cfg.resolve(1)
    model = build_model(cfg).eval()
    load_weights_only(model, cfg, run_dir / "checkpoints")
    m = cfg.model
    config = BertConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.ffn_size,
        max_position_embeddings=m.context_length, layer_norm_eps=m.norm_eps, hidden_act="gelu",
        num_labels=len(saved.finetune.labels), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip

    def hf_model(merge_lora: bool) -> BertForTokenClassification:
        hf = BertForTokenClassification(config).eval()
        tensors = {k: v for _, group in hf_tensor_groups(reader, saved, merge_lora) for k, v in group.items()}
        missing, unexpected = hf.load_state_dict(tensors, strict=False)  # no pooler: none exported
        assert not unexpected and not missing, (missing, unexpected)
        return hf

    tokens = torch.randint(10, m.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 8:] = 0
    types = torch.zeros_like(tokens)
    with torch.no_grad():
        ours = model.outputs(tokens, types, mask)[mask.bool()]
        merged = hf_model(True)(input_ids=tokens, attention_mask=mask, token_type_ids=types).logits[
            mask.bool()
        ]
        base = hf_model(False)
        base.save_pretrained(out / "base")
        write_peft_adapter(reader, saved, out / "adapter", out / "base")
        targets = json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"]
        assert targets.split("|")[:4] == [
            r"bert\.encoder\.layer\.0\.attention\.output\.dense", r"bert\.encoder\.layer\.0\.attention\.self\.key",
            r"bert\.encoder\.layer\.0\.attention\.self\.query", r"bert\.encoder\.layer\.0\.attention\.self\.value",
        ] and len(targets.split("|")) == 12  # fmt: skip
        peft = PeftModel.from_pretrained(
            BertForTokenClassification.from_pretrained(out / "base"), out / "adapter"
        )
        adapted = peft.eval()(input_ids=tokens, attention_mask=mask, token_type_ids=types).logits[mask.bool()]
        unadapted = base(input_ids=tokens, attention_mask=mask, token_type_ids=types).logits[mask.bool()]
    torch.testing.assert_close(merged, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapted, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unadapted, ours, atol=1e-3)  # the adapters changed the model


def save_base(tok: Path, out: Path) -> Path:
    """A bert pretraining model (MLM/NSP heads) of the tiny config, freshly built from another seed than
    the fine-tuning run's, saved as a weights-only checkpoint (TP1) at ``out``."""
    from safetensors.torch import save_file

    from bigtrain.checkpoint_files import write_manifest
    from bigtrain.config import load_config
    from bigtrain.registry import build_model, local_parameters
    from tokenizer import Tokenizer

    cfg = load_config(
        BERT_TINY, ["finetune.task=none", "data.mock=true", f"data.tokenizer={tok}", "train.seed=7"]
    )
    cfg.resolve(1, Tokenizer.load(tok).vocab_size)
    model = build_model(cfg)
    (out / "weights").mkdir(parents=True)
    tensors = {key: p.detach().contiguous() for key, (_, p) in local_parameters(model, cfg).items()}
    save_file(tensors, str(out / "weights" / "tp00_pp00.safetensors"))
    meta = {"step": 0, "consumed_samples": 0, "layout": {"tensor": 1, "pipeline": 1}, "config": cfg.to_dict()}
    (out / "bigtrain.json").write_text(json.dumps(meta))
    write_manifest(out, {}, step=0)
    return out


def test_fine_tune_from_a_bert_base_checkpoint(bert_tok: Path, tmp_path: Path):
    """checkpoint.load of a bert pretraining model: the body loads (the MLM/NSP heads stay behind), the
    frozen embedding and blocks come out bitwise the base's, the pooler and the new classifier train."""
    base = save_base(bert_tok, tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(32, 0))
    valid = write_jsonl(tmp_path / "valid.jsonl", pair_rows(16, 1))
    run_dir = tmp_path / "run"
    proc = single(
        run_args(bert_tok, train, valid, run_dir, f"checkpoint.load={base}", "train.steps=3",
                 "finetune.freeze_embeddings=true", "finetune.freeze_layers=2", "finetune.patience=0"),
        module=MODULE,
    )  # fmt: skip
    assert "loaded weights from" in proc.stdout
    before, after = reader_weights(base), reader_weights(run_dir / "checkpoints")
    heads = ("transform.dense.weight", "transform.dense.bias", "transform.norm.weight", "transform.norm.bias",
             "bias", "nsp.weight", "nsp.bias")  # fmt: skip
    assert {k for k in before if k.startswith("4.")} == {f"4.{n}" for n in heads}
    assert {k for k in after if k.startswith("4.")} == {"4.classifier.weight", "4.classifier.bias"}
    for key, value in after.items():
        index = int(key.split(".")[0])
        if index <= 2:  # embedding and both blocks: frozen at the base's values
            assert torch.equal(value, before[key]), key
        elif index == 3:  # the pooler: loaded, then trained
            assert not torch.equal(value, before[key]), key
