"""Hugging Face both ways for the bert family: a transformers-built ``BertForPreTraining`` (vocab 60, which
needs padding; eps 1e-6, init range 0.03, large random weights) with a WordPiece tokenizer made by
``tokenizers`` is imported (``tools/convert_from_hf.py``) and exported back (``tools/convert_to_hf.py``)
bitwise; bigtrain's ``BertModel`` on the import gives transformers' MLM and NSP logits (TP1 in process,
TP2 x PP2 over 4 processes); a mapping with key and value swapped does not; ``BertForMaskedLM`` and
``BertModel`` checkpoints import with their missing parts initialized fresh; architectures bigtrain's bert
does not compute are refused with exit status 2 and the field named."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from tests.tools.conftest import last_json, tool
from tests.tools.test_import import read_all
from tests.training.helpers import torchrun

WORDS = (
    "the of and to in is for on with as by at from this that cat dog sat mat run ran ##s ##ing ##ed".split()
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,'!?", *WORDS]
ARCH = {
    "vocab_size": len(VOCAB),  # 60: padded to 128 (TP1) / 256 (TP2)
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "max_position_embeddings": 24,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-6,
    "initializer_range": 0.03,
    "pad_token_id": 0,
}
BATCH, SEQ = 3, 20


def save_tokenizer(out) -> None:
    """A tiny BERT WordPiece tokenizer (BertNormalizer, BertPreTokenizer, [CLS] A [SEP] B [SEP] with token
    types), saved as a ``BertTokenizerFast`` directory."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    ids = {t: i for i, t in enumerate(VOCAB)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    specials = {f"{n}_token": f"[{n.upper()}]" for n in ("unk", "sep", "pad", "cls", "mask")}
    BertTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(out)


def random_bert(cls_name: str = "BertForPreTraining", seed: int = 0, **overrides):
    """A transformers-built BERT with large random weights (sharp outputs that any mapping mistake moves):
    LayerNorm weights around 1, biases 0.1, embeddings 0.3, matrices 0.15."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**{**ARCH, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.3 if "embeddings" in name else 0.15)
    return model


def save_hf(model, out):
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


def make_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """tokens [b, s] (real ids), token types 0 then 1, padding at the end of samples 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, len(VOCAB), (BATCH, SEQ), generator=g)
    tokens[:, 0] = 2  # [CLS]
    types = torch.zeros(BATCH, SEQ, dtype=torch.long)
    types[:, SEQ // 2 :] = 1
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -6:] = 0
    mask[2, -3:] = 0
    tokens[mask == 0] = 0
    return {"tokens": tokens, "token_types": types, "attention_mask": mask}


def hf_outputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(
            input_ids=inputs["tokens"],
            token_type_ids=inputs["token_types"],
            attention_mask=inputs["attention_mask"],
        )
    return out.prediction_logits, out.seq_relationship_logits


def bigtrain_outputs(ckpt, inputs, **model: object) -> tuple[torch.Tensor, torch.Tensor]:
    """bigtrain's BertModel (TP1, in process) on a checkpoint of any layout: MLM [b, s, vocab], NSP [b, 2]."""
    from bigtrain import registry
    from bigtrain.checkpoint import WeightReader, load_weights_only
    from bigtrain.config import config_from_dict

    cfg = config_from_dict(WeightReader(ckpt).meta["config"])
    cfg.checkpoint.load, cfg.train.device = None, "cpu"
    cfg.parallel.tensor = cfg.parallel.pipeline = 1  # the saved layout's weights, merged (any layout)
    for name, value in model.items():  # e.g. another vocabulary padding than the saved one
        setattr(cfg.model, name, value)
    cfg = cfg.resolve(1)
    model = registry.build_model(cfg)
    load_weights_only(model, cfg, ckpt)
    model.eval()
    with torch.no_grad():
        mlm, nsp = model.outputs(inputs["tokens"], inputs["token_types"], inputs["attention_mask"])
    return mlm.transpose(0, 1)[..., : cfg.model.vocab_size], nsp


def assert_bitwise(original: dict[str, torch.Tensor], back: dict[str, torch.Tensor]) -> None:
    assert set(original) == set(back), set(original) ^ set(back)
    differing = [
        k for k in original if original[k].dtype != back[k].dtype or not torch.equal(original[k], back[k])
    ]
    assert not differing, differing


@pytest.fixture(scope="module")
def bert_work(tmp_path_factory):
    return tmp_path_factory.mktemp("bert-hf")


@pytest.fixture(scope="module")
def hf_bert(bert_work):
    model = random_bert()
    return save_hf(model, bert_work / "hf"), model


@pytest.fixture(scope="module")
def imported_tp1(bert_work, hf_bert):
    out = bert_work / "imported-tp1"
    proc = tool("convert_from_hf", "--hf", hf_bert[0], "--output", out)
    assert "wrote" in proc.stdout and "initialized fresh" not in proc.stdout, proc.stdout
    assert "without dropout; hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1" in proc.stdout
    return out


@pytest.fixture(scope="module")
def exported_tp1(bert_work, imported_tp1):
    out = bert_work / "exported-tp1"
    tool("convert_to_hf", "--checkpoint", imported_tp1, "--output", out)
    return out


CONFIG_FIELDS = [*ARCH, "hidden_act", "model_type", "architectures", "tie_word_embeddings"]
CONFIG_FIELDS += ["hidden_dropout_prob", "attention_probs_dropout_prob"]


def test_round_trip_is_bitwise(hf_bert, imported_tp1, exported_tp1):
    from bigtrain.config import load_config

    m = load_config(imported_tp1 / "config.yaml").model
    assert (m.family, m.hf_model_type, m.activation, m.norm_eps, m.init_std) == (
        "bert",
        "bert",
        "gelu",
        1e-6,
        0.03,
    )
    assert (m.ffn_hidden_size, m.type_vocab_size, m.max_position_embeddings) == (96, 2, 24)
    assert_bitwise(read_all(hf_bert[0]), read_all(exported_tp1))
    a, b = (json.loads((d / "config.json").read_text()) for d in (hf_bert[0], exported_tp1))
    assert {k: a.get(k) for k in CONFIG_FIELDS} == {k: b.get(k) for k in CONFIG_FIELDS}
    assert (b["position_embedding_type"], b["is_decoder"], b["add_cross_attention"]) == (
        "absolute",
        False,
        False,
    )
    assert not (exported_tp1 / "generation_config.json").exists()


def test_imported_wordpiece_tokenizer_is_bigtrains(hf_bert, imported_tp1):
    """The HF directory's WordPiece tokenizer is copied where data.tokenizer points, and bigtrain's
    Tokenizer wraps it: the same ids as transformers' (with and without [CLS]/[SEP])."""
    from transformers import AutoTokenizer

    from bigtrain.config import load_config
    from tokenizer import Tokenizer

    cfg = load_config(imported_tp1 / "config.yaml")
    assert cfg.data.tokenizer == str(imported_tp1 / "step_00000000" / "tokenizer")
    ours, theirs = Tokenizer.load(cfg.data.tokenizer), AutoTokenizer.from_pretrained(hf_bert[0])
    text = "The cats sat on the mat, running! Ran?"
    ids = theirs(text)["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and ours.encode_as_hf(text) == ids
    assert ours.encode(text) == ids[1:-1] and ours.kind == "huggingface" and ours.vocab_size == len(VOCAB)


def test_export_loads_in_transformers_and_fills_masks(hf_bert, imported_tp1, exported_tp1):
    """AutoModelForPreTraining loads every tensor; MaskedLM leaves out the pooler and NSP head, AutoModel
    the heads (reported as unexpected, nothing missing); fill-mask picks bigtrain's argmax."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer, pipeline

    unused = {
        AutoModelForPreTraining: set(),
        AutoModelForMaskedLM: {"bert.pooler.", "cls.seq_relationship."},
        AutoModel: {"cls."},
    }
    for cls, prefixes in unused.items():
        model, info = cls.from_pretrained(exported_tp1, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (cls, info)
        assert {p for k in info["unexpected_keys"] for p in prefixes if k.startswith(p)} == prefixes, info
        assert all(k.startswith(tuple(prefixes)) for k in info["unexpected_keys"]), info
    tok = AutoTokenizer.from_pretrained(exported_tp1)
    text = "the cat [MASK] on the mat"
    enc = tok(text, return_tensors="pt")
    at = int((enc["input_ids"][0] == tok.mask_token_id).nonzero())
    inputs = {
        "tokens": enc["input_ids"],
        "token_types": enc["token_type_ids"],
        "attention_mask": enc["attention_mask"],
    }
    ours = bigtrain_outputs(imported_tp1, inputs)[0][0, at]
    best = pipeline("fill-mask", model=str(exported_tp1))(text)
    assert len(best) == 5 and best[0]["token"] == int(ours.argmax())
    assert best[0]["score"] == pytest.approx(float(ours.softmax(-1).max()), abs=1e-5)


def test_import_logits_equal_transformers(hf_bert, imported_tp1):
    inputs = make_inputs()
    mlm_hf, nsp_hf = hf_outputs(hf_bert[1], inputs)
    mlm, nsp = bigtrain_outputs(imported_tp1, inputs)
    d_mlm, d_nsp = (mlm - mlm_hf).abs().max().item(), (nsp - nsp_hf).abs().max().item()
    print(f"TP1 import: max |MLM - HF| {d_mlm:.2e}, max |NSP - HF| {d_nsp:.2e}")
    assert d_mlm <= 1e-5 and d_nsp <= 1e-5
    assert mlm_hf.std() > 1 and nsp_hf.abs().max() > 0.5  # sharp outputs, not a degenerate comparison
    # the padding mask is honoured: unmasking sample 1's padding changes its real tokens' logits
    unmasked = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    assert (bigtrain_outputs(imported_tp1, unmasked)[0][1, :-6] - mlm[1, :-6]).abs().max() > 1e-2


def test_swapped_key_value_mapping_fails_parity(hf_bert, bert_work, monkeypatch):
    """The control: the table with key and value exchanged imports without complaint, and the logits
    comparison above catches it."""
    from bigtrain.models import layout
    from tools.convert_from_hf import convert

    def swapped(spec: layout.ParamSpec) -> layout.ParamSpec:
        if spec.split != "qkv":
            return spec
        q, k, v = spec.hf
        return dataclasses.replace(spec, hf=(q, v, k))

    block = tuple(swapped(s) for s in layout.BERT_PARAMS[layout.BLOCK])
    monkeypatch.setitem(layout.BERT_PARAMS, layout.BLOCK, block)
    ckpt = convert(hf_bert[0], bert_work / "imported-swapped", progress=False)
    inputs = make_inputs()
    mlm_hf, nsp_hf = hf_outputs(hf_bert[1], inputs)
    mlm, nsp = bigtrain_outputs(ckpt, inputs)
    d_mlm, d_nsp = (mlm - mlm_hf).abs().max().item(), (nsp - nsp_hf).abs().max().item()
    print(f"key/value swapped: max |MLM - HF| {d_mlm:.2e}, max |NSP - HF| {d_nsp:.2e}")
    assert d_mlm > 1.0 and d_nsp > 1e-2


def test_masked_lm_and_base_model_import(bert_work, hf_bert, capsys):
    """BertForMaskedLM (no pooler, no NSP) and BertModel (no heads, no ``bert.`` prefix): what they hold
    imports exactly, what they lack starts from the table's init and is named in the output."""
    from bigtrain.config import load_config
    from bigtrain.models import layout
    from tools.convert_from_hf import convert
    from tools.convert_to_hf import export

    pretraining = read_all(hf_bert[0])
    for cls_name, absent in (
        ("BertForMaskedLM", ("bert.pooler.", "cls.seq_relationship.")),
        ("BertModel", ("cls.",)),
    ):
        source = random_bert(cls_name, seed=3)
        hf_dir = save_hf(source, bert_work / f"hf-{cls_name}")
        ckpt = convert(hf_dir, bert_work / f"imported-{cls_name}", progress=False)
        said = capsys.readouterr().out
        back = read_all(export(ckpt, bert_work / f"exported-{cls_name}", progress=False))
        fresh = {k for k in pretraining if k.startswith(absent)}
        assert f"{cls_name} has no" in said and all(k in said for k in fresh), said
        assert set(back) == set(pretraining)
        prefix = "bert." if cls_name == "BertModel" else ""
        assert_bitwise(
            {prefix + k: v for k, v in read_all(hf_dir).items()}, {k: back[k] for k in set(back) - fresh}
        )
        cfg = load_config(ckpt / "config.yaml").resolve(1)
        m = cfg.model
        for lp in layout.iter_layer_params(m):
            names = layout.hf_names(lp, m)
            if set(names) <= fresh:
                init = layout.init_full(lp.spec, lp.index, m, cfg.derived.padded_vocab_size, cfg.train.seed)
                assert torch.equal(layout.to_hf(lp, init, m)[names[0]], back[names[0]]), names
    inputs = make_inputs()
    masked_lm = random_bert("BertForMaskedLM", seed=3)
    with torch.no_grad():
        want = masked_lm(
            input_ids=inputs["tokens"],
            token_type_ids=inputs["token_types"],
            attention_mask=inputs["attention_mask"],
        ).logits
    got = bigtrain_outputs(bert_work / "imported-BertForMaskedLM", inputs)[0]
    assert (got - want).abs().max() <= 1e-5


def write_config(hf_dir, **fields):
    hf_dir.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["BertForPreTraining"], "model_type": "bert", **ARCH, **fields}
    (hf_dir / "config.json").write_text(json.dumps(config))
    return hf_dir


REFUSED = {
    "relative": ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    "act": ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    "decoder": ({"is_decoder": True}, "is_decoder=true"),
    "cross": ({"add_cross_attention": True}, "add_cross_attention=true"),
    "untied": ({"tie_word_embeddings": False}, "tie_word_embeddings=false"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_import_refuses_what_bert_does_not_compute(case, tmp_path):
    from tools.convert_from_hf import UnsupportedModel, convert

    fields, message = REFUSED[case]
    with pytest.raises(UnsupportedModel, match=message.replace("(", r"\(")):
        convert(write_config(tmp_path / "hf", **fields), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_import_cli_exits_2_naming_the_field(tmp_path, hf_bert):
    out = tmp_path / "ckpt"
    proc = tool("convert_from_hf", "--hf", write_config(tmp_path / "hf", position_embedding_type="relative_key_query"),
                "--output", out, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "config.json: cannot import: position_embedding_type='relative_key_query'" in proc.stderr, (
        proc.stderr
    )
    # a stored decoder that is not the word embedding: an untied model despite its config
    from safetensors.torch import load_file, save_file

    untied = tmp_path / "hf-untied"
    shutil.copytree(hf_bert[0], untied)
    tensors = load_file(str(untied / "model.safetensors"))
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"] + 1
    save_file(tensors, str(untied / "model.safetensors"), metadata={"format": "pt"})
    proc = tool("convert_from_hf", "--hf", untied, "--output", out, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "cls.predictions.decoder.weight differs from bert.embeddings.word_embeddings.weight" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_tp2_pp2_import_logits_and_export(hf_bert, bert_work):
    """Imported at TP2 x PP2 (a vocabulary split in two, the pooler and head on the last stage with their
    copy of the word embedding), the model run at that layout gives transformers' MLM and NSP logits;
    exported back, every tensor is the original's."""
    ckpt = bert_work / "imported-tp2pp2"
    tool(
        "convert_from_hf",
        "--hf",
        hf_bert[0],
        "--output",
        ckpt,
        "--tensor-parallel",
        2,
        "--pipeline-parallel",
        2,
    )
    inputs = make_inputs()
    torch.save(inputs, bert_work / "inputs.pt")
    out = bert_work / "tp2pp2-logits.pt"
    args = ["--inputs", str(bert_work / "inputs.pt"), "--checkpoint", str(ckpt), "--output", str(out)]
    torchrun(4, args, module="tests.tools.bert_logits_probe")
    ours = torch.load(out)
    mlm_hf, nsp_hf = hf_outputs(hf_bert[1], inputs)
    d_mlm, d_nsp = (ours["mlm"] - mlm_hf).abs().max().item(), (ours["nsp"] - nsp_hf).abs().max().item()
    print(f"TP2xPP2 import: max |MLM - HF| {d_mlm:.2e}, max |NSP - HF| {d_nsp:.2e}")
    assert ours["mlm"].shape == mlm_hf.shape and d_mlm <= 1e-4 and d_nsp <= 1e-4
    back = bert_work / "exported-tp2pp2"  # in 0.1 MB shards: several files and their index
    tool("convert_to_hf", "--checkpoint", ckpt, "--output", back, "--max-shard-size-mb", 0.1)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and set(index["weight_map"]) == set(read_all(back))
    assert_bitwise(read_all(hf_bert[0]), read_all(back))
    from transformers import AutoModelForPreTraining

    reloaded, info = AutoModelForPreTraining.from_pretrained(back, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(hf_outputs(reloaded.eval(), inputs)[0], mlm_hf)


def test_inspect_bert_checkpoint(imported_tp1):
    from tools.inspect_checkpoint import render

    info = last_json(tool("inspect_checkpoint", imported_tp1, "--json").stdout)
    mod = info["model"]
    assert (mod["family"], mod["type_vocab_size"], mod["layer_norm_eps"], mod["padded_vocab_size"]) == (
        "bert",
        2,
        1e-6,
        128,
    )
    by_key = {t["key"]: t for t in info["tensors"]}
    assert by_key["1.attention.qkv.weight"]["full_shape"] == [3 * 64, 64]
    assert by_key["5.nsp.weight"]["full_shape"] == [2, 64] and "5.word_embeddings.weight" not in by_key
    text = render(info)
    assert (
        f"bert encoder, 3 layers, hidden 64, heads 4 (dim 16), ffn 96, vocab {len(VOCAB)} (padded 128)"
        in text
    ), text


@pytest.mark.slow
def test_export_after_pretraining(tmp_path):
    """A bert run trained 3 steps at TP2 x PP2 by ``bigtrain.pretrain`` (mock data, vocab 500: padded) exports
    to a BertForPreTraining whose MLM and NSP logits equal bigtrain's on the trained weights."""
    from transformers import AutoModelForPreTraining

    from bigtrain.models import layout
    from tests.conftest import REPO

    run = tmp_path / "run"
    args = ["--config", str(REPO / "configs" / "bert-tiny.yaml"), "--set", "data.mock=true", "train.steps=3"]
    args += [f"train.run_dir={run}", "model.vocab_size=500", "parallel.pipeline=2", "parallel.tensor=2"]
    torchrun(4, args)
    out = tmp_path / "hf"
    tool("convert_to_hf", "--checkpoint", run / "checkpoints", "--output", out)
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["max_position_embeddings"], config["intermediate_size"]) == (
        500,
        64,
        256,
    )
    hf = AutoModelForPreTraining.from_pretrained(out).eval()
    inputs = make_inputs()
    inputs["tokens"] = torch.randint(5, 500, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    mlm_hf, nsp_hf = hf_outputs(hf, inputs)
    mlm, nsp = bigtrain_outputs(run / "checkpoints", inputs)
    d_mlm, d_nsp = (mlm - mlm_hf).abs().max().item(), (nsp - nsp_hf).abs().max().item()
    print(f"export after training: max |MLM - HF| {d_mlm:.2e}, max |NSP - HF| {d_nsp:.2e}")
    assert d_mlm <= 1e-5 and d_nsp <= 1e-5
    # trained weights, not the initial ones: the word embedding moved away from the table's init
    from bigtrain.checkpoint import WeightReader
    from tools.convert_to_hf import checkpoint_config

    cfg = checkpoint_config(WeightReader(run / "checkpoints"))
    lp = layout.tied_params(cfg.model)[0]
    init = layout.init_full(lp.spec, lp.index, cfg.model, cfg.derived.padded_vocab_size, cfg.train.seed)
    assert not torch.equal(hf.bert.embeddings.word_embeddings.weight.detach(), init[:500])


def test_generate_refuses_an_encoder(imported_tp1, exported_tp1):
    """tools/generate.py on a bert checkpoint or export: one line saying an encoder does not generate."""
    for source in (["--checkpoint", imported_tp1], ["--hf", exported_tp1]):
        proc = tool("generate", *source, "--prompt-ids", "5,6", check=False)
        assert proc.returncode == 1 and "does not generate text" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_load_at_another_vocabulary_padding(hf_bert, imported_tp1):
    """A checkpoint loaded where the vocabulary pads to another size (another tensor size does that for
    real vocabularies: 30522 pads to 30592 at TP1, 30720 at TP2): the word embedding and the 1-D MLM bias
    are re-padded, and the logits stay transformers'."""
    inputs = make_inputs()
    mlm, nsp = bigtrain_outputs(imported_tp1, inputs, make_vocab_size_divisible_by=512)
    mlm_hf, nsp_hf = hf_outputs(hf_bert[1], inputs)
    torch.testing.assert_close(mlm, mlm_hf, rtol=0, atol=1e-5)
    torch.testing.assert_close(nsp, nsp_hf, rtol=0, atol=1e-5)
