"""The bert family's fine-tuning in process: the sequence and token classifiers' logits equal transformers'
BertForSequenceClassification / BertForTokenClassification with the same weights; the data encoding
(text pairs, token types, longest-first truncation, first-piece tags) and its errors; entity-level
metrics against an independent implementation and seqeval's documented examples; LoRA targets, freezing
and the HF export overrides for the encoder."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.finetune import data as d
from bigtrain.metrics import entity_scores, iob2_entities

pytestmark = pytest.mark.timeout(180)
VOCAB = 100


def bert_cfg(task: str, *overrides: str):
    return load_config(
        None,
        [
            "model.family=bert", "model.hf_model_type=bert", "model.activation=gelu", "model.tie_embeddings=true",
            "model.norm_eps=1e-12", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
            "model.ffn_hidden_size=128", "model.seq_length=16", f"model.vocab_size={VOCAB}", "train.device=cpu",
            f"finetune.task={task}", "finetune.train=unused", "data.tokenizer=unused", "model.init_std=0.2",
            "finetune.labels=[B-LOC,B-PER,I-LOC,I-PER,O]", *overrides,
        ],
    ).resolve(1)  # fmt: skip


def hf_twin(cfg, model):
    """The transformers model of ``cfg``'s task holding ``model``'s weights (by the layout's HF names);
    also the HF names the layout has that the HF model lacks."""
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    from bigtrain.models import layout
    from bigtrain.registry import local_parameters

    m = cfg.model
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=m.context_length, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
        num_labels=len(cfg.finetune.labels), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )  # fmt: skip
    cls = (
        BertForTokenClassification if cfg.finetune.task == "token_classify" else BertForSequenceClassification
    )
    hf = cls(config).eval()
    tensors = {}
    for lp, param in local_parameters(model, cfg).values():  # tensor size 1: the full tensors
        tensors.update(layout.to_hf(lp, param.detach(), m))
    own = hf.state_dict()
    extra = sorted(set(tensors) - set(own))
    missing = sorted(set(own) - set(tensors) - {"bert.embeddings.position_ids"})
    assert not missing, missing
    hf.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    return hf, extra


@pytest.mark.parametrize("task", ["classify", "token_classify"])
def test_heads_equal_transformers_bert_classifiers(task: str):
    from bigtrain.registry import build_model, local_parameters

    cfg = bert_cfg(task)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a bias that is not the init's zeros, so its name and place are checked too
        for key, (_, param) in local_parameters(model, cfg).items():
            if key.endswith("classifier.bias"):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    hf, extra = hf_twin(cfg, model)
    # BertForTokenClassification has no pooler (add_pooling_layer=False): the one tensor it does not load
    assert extra == (
        ["bert.pooler.dense.bias", "bert.pooler.dense.weight"] if task == "token_classify" else []
    )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, VOCAB, (3, 16), generator=gen)
    lengths = [16, 11, 6]
    mask = torch.tensor([[1] * n + [0] * (16 - n) for n in lengths])
    types = torch.tensor([[0] * (n // 2) + [1] * (16 - n // 2) for n in lengths]) * mask
    with torch.no_grad():
        ours = model.outputs(tokens, types, mask)
        theirs = hf(input_ids=tokens, attention_mask=mask, token_type_ids=types).logits
    assert ours.shape == theirs.shape == ((3, 16, 5) if task == "token_classify" else (3, 5))
    if task == "token_classify":  # the real tokens (padding positions are never read)
        real = mask.bool()
        ours, theirs = ours[real], theirs[real]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- data
class LetterTokenizer:
    """Stands in for an HF tokenizer: one id per letter (a=10, b=11, ...), words split on spaces."""

    def __call__(self, text, is_split_into_words: bool = False, add_special_tokens: bool = True):
        from transformers import BatchEncoding

        words = text if is_split_into_words else text.split()
        ids, word_ids = [], []
        for w, word in enumerate(words):
            ids += [10 + "abcdefghijklmnop".index(c) for c in word]
            word_ids += [w] * len(word)
        enc = BatchEncoding({"input_ids": ids})
        enc.word_ids = lambda: word_ids  # type: ignore[method-assign]
        return enc


def make_bert_tokenizer(root: Path) -> Path:
    """A letter tokenizer (single letters as pieces, a few merges) with BERT's specials and HF files."""
    from tests.conftest import run_cmd
    from tests.finetune.helpers import LETTERS, MARKERS, write_jsonl

    rng = random.Random(0)
    alphabet = LETTERS + "".join(MARKERS)
    docs = [" ".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8))) for _ in range(300)]
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": doc} for doc in docs])
    run_cmd(
        [sys.executable, "-m", "tokenizer.train", "--input", str(corpus), "--vocab-size", "310", "--output",
         str(root / "tok"), "--bert-specials"],
        timeout=120,
    )  # fmt: skip
    return root / "tok"


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_tokenizer(tmp_path_factory.mktemp("bert_tok"))


def test_specials_from_the_tokenizer_and_a_clear_error_without_them(bert_tok: Path, tok_dir: Path):
    from tokenizer import Tokenizer

    tok = Tokenizer.load(bert_tok)
    assert d.Specials.of(bert_tok) == d.Specials(cls=tok.cls_id, sep=tok.sep_id, pad=tok.pad_id)
    with pytest.raises(d.DataError, match=r"tokenizer has no \[CLS\] \[SEP\] token.*--bert-specials"):
        d.Specials.of(tok_dir)  # the decoder tests' tokenizer


def test_pairs_encode_as_transformers_truncates_longest_first(bert_tok: Path, tmp_path: Path):
    """[CLS] A [SEP] B [SEP], token types and longest-first truncation as the exported tokenizer (BERT-style
    HF files) gives them, over random lengths of both texts and of the budget."""
    hf = d.hf_tokenizer(bert_tok)
    specials = d.Specials.of(bert_tok)
    rng = random.Random(0)
    for _ in range(200):
        a, b = (" ".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 12))) for _ in range(2))
        pair = rng.random() < 0.8
        length = rng.randint(6, 30)
        want = hf(a, b if pair else None, truncation="longest_first", max_length=length)
        ids_a, ids_b = (hf(t, add_special_tokens=False)["input_ids"] for t in (a, b))
        got = d.encode_pair(ids_a, ids_b if pair else None, specials, length, "truncate", d.ReadStats())
        assert got == (want["input_ids"], want["token_type_ids"]), (a, b, pair, length)


def test_classify_pairs_token_types_and_longest_first_truncation(tmp_path: Path):
    rows = [
        {"text": "ab c", "label": "yes"},
        {"text": "abc", "text_pair": "de", "label": "no"},
        {"text": "abcdefg", "text_pair": "hijklmnop", "label": "no"},  # 7 + 9 letters in 10 tokens
        {"text": "a", "label": 3},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specials = d.Specials(cls=4, sep=5, pad=3)
    examples, stats, labels = d.read_classify_pairs(
        path, "finetune.train", LetterTokenizer(), specials, 13, "truncate", True, None
    )
    assert labels == ["3", "no", "yes"] and stats.truncated == 1 and stats.used == 4
    assert examples[0].tokens == [4, 10, 11, 12, 5] and examples[0].token_types == [0] * 5
    assert examples[0].target == 2
    assert examples[1].tokens == [4, 10, 11, 12, 5, 13, 14, 5]
    assert examples[1].token_types == [0, 0, 0, 0, 0, 1, 1, 1] and examples[1].target == 1
    # longest first: both longer than half the budget, so each keeps half (HF tokenizers' longest_first)
    assert examples[2].tokens == [4, *range(10, 15), 5, *range(17, 22), 5]
    assert examples[2].token_types == [0] * 7 + [1] * 6
    item = d.encoder_item(examples[1], 13, specials.pad)
    assert item["tokens"].tolist() == [4, 10, 11, 12, 5, 13, 14, 5, 3, 3, 3, 3, 3]
    assert item["attention_mask"].tolist() == [1] * 8 + [0] * 5
    assert item["token_types"].tolist() == [0] * 5 + [1] * 3 + [0] * 5
    assert item["labels"].item() == 1 and item["loss_mask"].item() == 1.0
    dropped, dstats, _ = d.read_classify_pairs(
        path, "finetune.train", LetterTokenizer(), specials, 13, "drop", True, labels
    )
    assert len(dropped) == 3 and dstats.dropped == 1


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"txt": "ab", "label": "x"}, "expected a non-empty string field 'text'"),
        ({"text": "ab", "text_pair": 3, "label": "x"}, "'text_pair' must be a non-empty string"),
        ({"text": "ab", "label": [1]}, "'label' must be a string or an integer"),
    ],
)
def test_classify_pair_errors_name_the_line_and_the_keys(tmp_path: Path, record: dict, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(d.DataError, match=rf"bad.jsonl:2: {message}.*'text_pair'"):
        d.read_classify_pairs(
            path, "finetune.train", LetterTokenizer(), d.Specials(4, 5, 3), 16, "truncate", True, None
        )


def test_token_classify_tags_the_first_piece_of_each_word(tmp_path: Path):
    path = tmp_path / "tags.jsonl"
    rows = [
        {"tokens": ["ab", "c", "def"], "tags": ["B-PER", "I-PER", "O"]},
        {"tokens": ["a", "bcdefgh", "i"], "tags": ["O", "B-LOC", "B-PER"]},  # truncated inside word 2
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specials = d.Specials(4, 5, 3)
    examples, stats, labels = d.read_token_classify(
        path, "finetune.train", LetterTokenizer(), specials, 8, "truncate", True, None
    )
    assert labels == ["O", "B-LOC", "B-PER", "I-PER"] and stats.truncated == 1
    o, b_loc, b_per, i_per = range(4)
    assert examples[0].tokens == [4, 10, 11, 12, 13, 14, 15, 5]
    assert examples[0].target == [-1, b_per, -1, i_per, o, -1, -1, -1]
    assert examples[1].tokens == [4, 10, 11, 12, 13, 14, 15, 5]  # [CLS] a bcdef [SEP]; "i" cut off
    assert examples[1].target == [-1, o, b_loc, -1, -1, -1, -1, -1]
    item = d.encoder_item(examples[0], 10, specials.pad)
    assert item["loss_mask"].tolist() == [0, 1, 0, 1, 1, 0, 0, 0, 0, 0]
    assert item["labels"].tolist() == [0, b_per, 0, i_per, o, 0, 0, 0, 0, 0]
    assert item["token_types"].tolist() == [0] * 10


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"tokens": ["a"], "tags": ["O", "O"]}, r"'tags' must be a list as long as 'tokens' \(1\)"),
        ({"tokens": "a b", "tags": ["O"]}, "'tokens' must be a non-empty list of non-empty strings"),
        ({"tokens": ["a"], "tags": ["PER"]}, "tag 'PER' is not an IOB2 tag"),
        ({"tokens": ["a"], "tags": ["E-PER"]}, "tag 'E-PER' is not an IOB2 tag"),
    ],
)
def test_token_classify_errors(tmp_path: Path, record: dict, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(d.DataError, match=rf"bad.jsonl:1: {message}"):
        d.read_token_classify(
            path, "finetune.train", LetterTokenizer(), d.Specials(4, 5, 3), 16, "truncate", True, None
        )
    _, stats, _ = d.read_token_classify(
        path, "finetune.train", LetterTokenizer(), d.Specials(4, 5, 3), 16, "truncate", False, ["O", "B-X"]
    )
    assert stats.skipped["malformed"] == 1


def test_token_classify_tag_set_from_finetune_labels(tmp_path: Path):
    path = tmp_path / "tags.jsonl"
    path.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["B-PER", "O"]}) + "\n")
    path.write_text(path.read_text() + json.dumps({"tokens": ["a"], "tags": ["B-LOC"]}) + "\n")
    args = (path, "finetune.train", LetterTokenizer(), d.Specials(4, 5, 3), 16, "truncate")
    examples, _, labels = d.read_token_classify(*args, False, ["B-PER", "I-PER", "O"])
    assert labels == ["B-PER", "I-PER", "O"] and [ex.target for ex in examples] == [[-1, 0, 2, -1]]
    with pytest.raises(d.DataError, match=r"tags.jsonl:2: tags \['B-LOC'\] are not in finetune.labels"):
        d.read_token_classify(*args, True, ["B-PER", "I-PER", "O"])
    with pytest.raises(d.DataError, match="finetune.labels: tag 'PER' is not an IOB2 tag"):
        d.read_token_classify(*args, False, ["B-PER", "PER", "O", "B-LOC"])


# ---------------------------------------------------------------------------- entity metrics
def spans_by_enumeration(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entities by checking every (start, end): an entity of type X starts at ``start`` when the tag there
    is B-X, or I-X not preceded by a tag of type X (conlleval: an I- after O or another type begins one);
    it covers I-X tags only after its start, and ends where the next tag is not I-X."""
    kind = [t[2:] if t != "O" else None for t in tags]
    found = set()
    for start in range(len(tags)):
        x = kind[start]
        if x is None:
            continue
        if tags[start].startswith("I-") and start > 0 and kind[start - 1] == x:
            continue  # continues an entity opened before
        for end in range(start, len(tags)):
            if end > start and tags[end] != f"I-{x}":
                break
            if end + 1 == len(tags) or tags[end + 1] != f"I-{x}":
                found.add((x, start, end))
                break
    return found


def test_entities_equal_an_independent_enumeration_on_random_ill_formed_tags():
    rng = random.Random(0)
    vocabulary = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    for _ in range(3000):
        tags = [rng.choice(vocabulary) for _ in range(rng.randint(0, 12))]
        assert set(iob2_entities(tags)) == spans_by_enumeration(tags), tags
    # micro scores as counts of exact (sequence, type, span) matches
    true = [[rng.choice(vocabulary) for _ in range(10)] for _ in range(200)]
    pred = [[t if rng.random() < 0.7 else rng.choice(vocabulary) for t in seq] for seq in true]
    gold = {(n, *e) for n, s in enumerate(true) for e in spans_by_enumeration(s)}
    found = {(n, *e) for n, s in enumerate(pred) for e in spans_by_enumeration(s)}
    scores = entity_scores(true, pred)
    hits = len(gold & found)
    assert scores["micro"]["precision"] == pytest.approx(hits / len(found))
    assert scores["micro"]["recall"] == pytest.approx(hits / len(gold))
    per = {e[1] for e in gold}
    assert set(scores) == {"micro", *per}
    assert sum(scores[k]["support"] for k in per) == len(gold)


def test_entities_as_seqeval_documents_them():
    # seqeval's README: get_entities
    assert iob2_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # conlleval semantics for ill-formed IOB2: I- without B- begins an entity, a type change splits
    assert iob2_entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]
    assert iob2_entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert iob2_entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]
    assert iob2_entities(["O", "I-MISC", "B-MISC", "I-MISC"]) == [("MISC", 1, 1), ("MISC", 2, 3)]
    # seqeval's README example: f1 0.50; MISC p=r=f1=0, PER 1.00, micro avg 0.50 0.50 0.50 support 2
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_scores(y_true, y_pred)
    assert scores["micro"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2.0}
    assert scores["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1.0}
    assert scores["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1.0}
    with pytest.raises(ValueError, match="tag 'X-PER' at position 1"):
        iob2_entities(["O", "X-PER"])


def test_token_metrics_report_per_type_scores():
    from bigtrain.finetune.trainer import token_metrics

    tags = ["O", "B-LOC", "B-PER", "I-PER"]
    out = token_metrics([[2, 3, 0, 1]], [[2, 3, 0, 0]], tags)
    assert out["val_accuracy"] == 0.75 and out["val_entities"] == 1
    assert out["val_precision"] == 0.5 and out["val_recall"] == 1.0
    assert out["val_PER_f1"] == 1.0 and out["val_LOC_precision"] == 0.0 and out["val_LOC_support"] == 0


# ---------------------------------------------------------------------------- LoRA, freezing, export
def test_lora_targets_bert_projections_and_freezes_the_rest():
    from bigtrain.finetune.params import lora_specs
    from bigtrain.registry import build_model, local_parameters

    cfg = bert_cfg("classify", "finetune.lora.rank=2")
    names = [s.name for s in lora_specs(cfg.model, cfg.finetune)]
    assert names == [
        f"{m}.lora_{ab}" for m in ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2") for ab in "AB"
    ]
    model = build_model(cfg).eval()
    trainable = {k for k, (_, p) in local_parameters(model, cfg).items() if p.requires_grad}
    assert trainable == {f"{i}.{n}" for i in (1, 2) for n in names} | {
        "4.classifier.weight",
        "4.classifier.bias",
    }
    plain = build_model(bert_cfg("classify")).eval()
    tokens = torch.randint(5, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(tokens)
    with torch.no_grad():  # B = 0: the adapters start as the identity
        torch.testing.assert_close(
            model.outputs(tokens, ones * 0, ones), plain.outputs(tokens, ones * 0, ones)
        )
        block = model.blocks[0].mlp.fc1
        block.lora_B.normal_()
        assert not torch.allclose(
            model.outputs(tokens, ones * 0, ones), plain.outputs(tokens, ones * 0, ones)
        )

    frozen = bert_cfg("token_classify", "finetune.freeze_embeddings=true", "finetune.freeze_layers=1")
    fmodel = build_model(frozen)
    still = {
        int(k.split(".")[0]) for k, (_, p) in local_parameters(fmodel, frozen).items() if not p.requires_grad
    }
    assert still == {0, 1}


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "rmsprop"])
def test_layer_decay_and_optimizers_on_bert_layers(optimizer: str):
    from bigtrain.engine import build_optimizer, layer_lr_scales
    from bigtrain.registry import build_model, local_parameters

    cfg = bert_cfg(
        "token_classify", "optim.layer_decay=0.5", f"optim.name={optimizer}", "finetune.freeze_layers=1"
    )
    model = build_model(cfg)
    scales = layer_lr_scales(model, cfg)
    params = local_parameters(model, cfg).values()
    by_index = {lp.index: scales[id(p)] for lp, p in params}
    assert by_index == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0, 4: 1.0}
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for lp, p in params:  # the frozen block is not given to the optimizer; the others at their decayed lr
        assert lr_of.get(id(p)) == (None if lp.index == 1 else cfg.optim.lr * by_index[lp.index]), lp.key
    assert type(opt).__name__.lower() == {"adamw": "adamw", "adam": "adam"}.get(optimizer, optimizer)


def test_hf_overrides_and_head_names():
    from bigtrain.finetune.export import hf_config_overrides
    from bigtrain.finetune.params import task_params
    from bigtrain.models import layout

    for task, arch in (
        ("classify", "BertForSequenceClassification"),
        ("token_classify", "BertForTokenClassification"),
    ):
        cfg = bert_cfg(task)
        out = hf_config_overrides(cfg)
        assert out["architectures"] == [arch] and out["num_labels"] == 5
        assert out["id2label"]["1"] == "B-PER" and out["label2id"]["I-PER"] == 3
        head = [lp for lp in layout.iter_layer_params(cfg.model, task=task_params(cfg)) if lp.index == 4]
        assert [layout.hf_names(lp, cfg.model) for lp in head] == [
            ("classifier.weight",),
            ("classifier.bias",),
        ]
    sft = load_config(
        None, ["finetune.task=classify", "finetune.train=x", "data.tokenizer=x", "finetune.labels=[a,b]"]
    )
    assert hf_config_overrides(sft)["architectures"] == ["LlamaForSequenceClassification"]
