"""The bert family in one process: every parameter in the layout table, logits and loss equal to
transformers' ``BertForPreTraining`` with the same weights (fp32), recomputation changing nothing, and the
config's checks. Parallel layouts: tests/training/test_bert.py; HF conversion: tests/tools/test_bert_hf.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigtrain import registry
from bigtrain.config import ConfigError, config_from_dict
from bigtrain.models import layout

VOCAB, SEQ, BATCH = 100, 16, 3
BERT_TINY = {
    "family": "bert",
    "hf_model_type": "bert",
    "activation": "gelu",
    "tie_embeddings": True,
    "num_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "seq_length": SEQ,
    "vocab_size": VOCAB,  # padded to 128: the decoder's padding rows must stay out of the logits
    "norm_eps": 1e-12,
}


def bert_cfg(**model):
    cfg = config_from_dict({"model": {**BERT_TINY, **model}, "data": {"mock": True}})
    return cfg.resolve(1)


def random_bert(cfg, seed: int = 0):
    """A bigtrain BertModel with random weights (large enough that mapping mistakes show) and the same
    weights as transformers' BertForPreTraining (eval mode, no dropout)."""
    from transformers import BertConfig, BertForPreTraining

    model = registry.build_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    hf = {}
    for lp, param in registry.local_parameters(model, cfg).values():
        hf.update(layout.to_hf(lp, param.detach(), cfg.model))
    m = cfg.model
    ref = BertForPreTraining(
        BertConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            intermediate_size=m.ffn_size,
            max_position_embeddings=m.context_length,
            layer_norm_eps=m.norm_eps,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).eval()
    result = ref.load_state_dict(hf, strict=False)
    assert not result.unexpected_keys, result
    assert sorted(result.missing_keys) == ["cls.predictions.decoder.bias", "cls.predictions.decoder.weight"]
    return model, ref


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    types = torch.zeros(BATCH, SEQ, dtype=torch.long)
    types[:, SEQ // 2 :] = 1
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 11:] = 0  # padding: the keys attention must not see
    mask[2, 6:] = 0
    return tokens, types, mask


def test_every_parameter_is_in_the_layout_table_once():
    cfg = bert_cfg()
    model = registry.build_model(cfg)
    table = {id(p) for _, p in registry.local_parameters(model, cfg).values()}
    names = [n for n, p in model.named_parameters() if id(p) not in table]
    assert not names, f"parameters no layout row covers: {names}"
    assert len(table) == len(list(model.parameters()))
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(
        torch.Size(layout.full_shape(lp.spec, cfg.model, 128)).numel()
        for lp in layout.iter_layer_params(cfg.model)
    )


def test_logits_and_loss_equal_transformers():
    cfg = bert_cfg()
    model, ref = random_bert(cfg)
    tokens, types, mask = batch()
    with torch.no_grad():
        mlm, nsp = model.outputs(tokens, types, mask)  # [s, b, vocab], [b, 2]
        out = ref(input_ids=tokens, token_type_ids=types, attention_mask=mask)
    assert mlm.shape == (SEQ, BATCH, VOCAB)
    torch.testing.assert_close(mlm.transpose(0, 1), out.prediction_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(nsp, out.seq_relationship_logits, rtol=0, atol=1e-5)

    # the loss: MLM over the masked positions + NSP, as HF's (labels -100 where nothing is predicted)
    gen = torch.Generator().manual_seed(2)
    loss_mask = (torch.rand(BATCH, SEQ, generator=gen) < 0.3).float() * mask
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    nsp_labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        ours = model(tokens, types, mask, labels, loss_mask, nsp_labels)
        hf_labels = torch.where(loss_mask.bool(), labels, -100)
        theirs = ref(
            input_ids=tokens,
            token_type_ids=types,
            attention_mask=mask,
            labels=hf_labels,
            next_sentence_label=nsp_labels,
        ).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_a_wrong_mapping_is_caught():
    """Control: the same comparison with query and key swapped in one block fails."""
    cfg = bert_cfg()
    model, ref = random_bert(cfg)
    sd = ref.state_dict()
    q, k = (
        "bert.encoder.layer.1.attention.self.query.weight",
        "bert.encoder.layer.1.attention.self.key.weight",
    )
    ref.load_state_dict({**sd, q: sd[k], k: sd[q]})
    tokens, types, mask = batch()
    with torch.no_grad():
        mlm, _ = model.outputs(tokens, types, mask)
        out = ref(input_ids=tokens, token_type_ids=types, attention_mask=mask)
    assert (mlm.transpose(0, 1) - out.prediction_logits).abs().max() > 1e-4  # 10x the tolerance


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_changes_nothing(mode):
    base = bert_cfg()
    model, _ = random_bert(base)
    cfg = bert_cfg()
    cfg.activation_checkpointing = mode
    recomputing = registry.build_model(cfg)
    recomputing.load_state_dict(model.state_dict())
    tokens, types, mask = batch()
    labels, loss_mask, nsp = tokens.flip(1), mask.float(), torch.tensor([1, 0, 1])
    for m in (model, recomputing):
        m.zero_grad()
        m(tokens, types, mask, labels, loss_mask, nsp).backward()
    for (name, a), b in zip(model.named_parameters(), recomputing.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_mlm_only_loss_leaves_nsp_out():
    """data.masking.sentence_pair none: the loss is the MLM term alone."""
    cfg = bert_cfg()
    cfg.data.masking.sentence_pair = "none"
    model = registry.build_model(cfg)
    tokens, types, mask = batch()
    loss_mask = mask.float()
    with torch.no_grad():
        mlm, _ = model.outputs(tokens, types, mask)
        loss = model(tokens, types, mask, tokens, loss_mask, torch.zeros(BATCH, dtype=torch.long))
    per_token = F.cross_entropy(mlm.transpose(0, 1).reshape(-1, VOCAB), tokens.reshape(-1), reduction="none")
    expected = (per_token * loss_mask.reshape(-1)).sum() / loss_mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"activation": "silu"}, "model.family bert needs model.activation gelu"),
        ({"hf_model_type": "llama"}, "model.family bert needs model.hf_model_type bert"),
        ({"tie_embeddings": False}, "set tie_embeddings true"),
        ({"num_kv_heads": 2}, "model.num_kv_heads is a decoder setting"),
        ({"qk_norm": True}, "model.qk_norm is a decoder setting"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "no rotary"),
    ],
)
def test_config_refuses_decoder_settings(change, needle):
    with pytest.raises(ConfigError, match=needle):
        bert_cfg(**change)


def test_decoder_refuses_bert_settings():
    cfg = config_from_dict({"model": {"vocab_size": 100, "activation": "gelu"}, "data": {"mock": True}})
    with pytest.raises(ConfigError, match="the bert family's"):
        cfg.resolve(1)


def test_config_refuses_what_bert_samples_or_tasks_cannot_do():
    with pytest.raises(ConfigError, match="model.type_vocab_size 1: data.masking.sentence_pair nsp"):
        bert_cfg(type_vocab_size=1)
    cfg = config_from_dict({"model": {**BERT_TINY, "type_vocab_size": 1}, "data": {"mock": True}})
    cfg.data.masking.sentence_pair = "none"  # one segment: one token type is enough
    cfg.resolve(1)
    tasks = {"finetune": {"task": "sft", "train": "x.jsonl"}, "data": {"tokenizer": "tok"}}
    with pytest.raises(ConfigError, match="finetune.task sft is not available for model.family bert"):
        config_from_dict({"model": BERT_TINY, **tasks}).resolve(1)
    tasks["finetune"]["task"] = "token_classify"
    with pytest.raises(
        ConfigError, match="finetune.task token_classify is not available for model.family llama"
    ):
        config_from_dict({"model": {"vocab_size": 100}, **tasks}).resolve(1)
    with pytest.raises(
        ConfigError, match="data.mock=true trains on random tokens and ignores data.train=corpus"
    ):
        config_from_dict({"model": BERT_TINY, "data": {"mock": True, "train": "corpus"}}).resolve(1)


def test_learned_positions_and_token_types_are_shape_fields():
    from bigtrain.checkpoint import model_shape_differences

    saved = bert_cfg().model
    assert model_shape_differences(saved, bert_cfg().model) == []
    diffs = model_shape_differences(saved, bert_cfg(max_position_embeddings=32, type_vocab_size=3).model)
    assert diffs == [
        "model.max_position_embeddings: checkpoint 16 vs config 32",
        "model.type_vocab_size: checkpoint 2 vs config 3",
    ]
