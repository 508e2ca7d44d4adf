"""The parameter table: shard/merge are inverses, HF mapping round-trips, and the model equals
transformers' LlamaForCausalLM on the exported weights (fp32, single process)."""

from __future__ import annotations

import pytest
import torch

from bigtrain.config import load_config
from bigtrain.models import layout
from tests.conftest import REPO


def tiny_cfg(*overrides: str):
    base = [
        "model.vocab_size=300",
        "model.num_attention_heads=4",
        "model.num_kv_heads=2",
        "model.rope_theta=5000",
    ]
    return load_config(REPO / "configs" / "tiny.yaml", base + list(overrides)).resolve(1)


@pytest.mark.parametrize("split", ["vocab", "col", "row", "qkv", "gate_up", "replicated"])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_shard_merge_inverse(split, size):
    full = torch.randn(16, 8)
    shards = [layout.shard(full, split, r, size) for r in range(size)]
    assert torch.equal(layout.merge(shards, split), full)


def test_gate_up_shard_holds_matching_gate_and_up_rows():
    ffn = 4
    full = torch.arange(2 * ffn).float()[:, None]  # gate rows 0..3, up rows 4..7
    r1 = layout.shard(full, "gate_up", 1, 2)
    assert r1.flatten().tolist() == [2, 3, 6, 7]


def test_replicated_merge_refuses_disagreeing_ranks():
    with pytest.raises(ValueError, match="differs between tensor ranks"):
        layout.merge([torch.ones(3), torch.zeros(3)], "replicated", "x")


def test_hf_mapping_round_trip_and_vocab_padding():
    cfg = tiny_cfg()
    m, padded = cfg.model, cfg.derived.padded_vocab_size
    for lp in layout.iter_layer_params(m):
        full = layout.init_full(lp.spec, lp.index, m, padded, seed=1)
        hf = layout.to_hf(lp, full, m)
        if lp.spec.split == "vocab":
            assert next(iter(hf.values())).shape[0] == m.vocab_size
            assert torch.count_nonzero(full[m.vocab_size :]) == 0
        assert torch.equal(layout.from_hf(lp, hf, m, padded), full)


def test_init_is_layout_independent():
    cfg = tiny_cfg()
    lp = next(p for p in layout.iter_layer_params(cfg.model) if p.spec.split == "qkv")
    a = layout.init_full(lp.spec, lp.index, cfg.model, cfg.derived.padded_vocab_size, seed=7)
    b = layout.init_full(lp.spec, lp.index, cfg.model, cfg.derived.padded_vocab_size, seed=7)
    c = layout.init_full(lp.spec, lp.index, cfg.model, cfg.derived.padded_vocab_size, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture
def world_of_one(monkeypatch):
    from tests.conftest import free_port

    # setenv (not delenv) so that whatever init_distributed writes is undone after the test
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    yield
    from bigtrain.distributed import shutdown

    shutdown()


def _logits_equal_transformers_llama(tie: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bigtrain.registry import build_model, local_parameters

    cfg = tiny_cfg(f"model.tie_embeddings={str(tie).lower()}")
    model = build_model(cfg).eval()
    m = cfg.model
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.kv_heads,
            rms_norm_eps=m.norm_eps,
            rope_theta=m.rope_theta,
            tie_word_embeddings=tie,
            max_position_embeddings=m.seq_length,
        )
    ).eval()
    state = {}
    for lp, param in local_parameters(model, cfg).values():
        state.update(layout.to_hf(lp, param.detach(), m))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if tie else [])
    tokens = torch.randint(0, m.vocab_size, (3, m.seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.outputs(tokens).permute(1, 0, 2)  # [b, s, vocab]: size 1 leaves the padding out
        theirs = hf(tokens).logits
    assert m.vocab_size < cfg.derived.padded_vocab_size and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_transformers_llama(world_of_one, tie):
    """In a world of one process, as training builds it."""
    from bigtrain.distributed import init_distributed

    init_distributed(tiny_cfg())
    _logits_equal_transformers_llama(tie)


@pytest.mark.parametrize("tie", [False, True])
def test_model_without_process_group_equals_transformers_llama(tie):
    """Built at tensor size 1 with no process group at all (the layers take their tensor-parallel place
    as an argument), it still computes what LlamaForCausalLM computes."""
    assert not torch.distributed.is_initialized()
    _logits_equal_transformers_llama(tie)
    assert not torch.distributed.is_initialized()


def test_model_reads_top_to_bottom_by_role():
    """Role-named children, and the layer list the pipeline engine gets is the same layers in order."""
    from bigtrain.models.llama import LlamaModel
    from bigtrain.models.parallelize import tensor_parallel
    from bigtrain.registry import build_model

    cfg = tiny_cfg()
    model = build_model(cfg)
    assert [name for name, _ in model.named_children()] == ["embedding", "blocks", "final_norm", "output"]
    specs = LlamaModel.layer_specs(cfg.model, tensor_parallel(cfg), cfg.derived.padded_vocab_size)
    built = [model.embedding, *model.blocks, model.final_norm, model.output]
    assert [spec.typename for spec in specs] == [type(m) for m in built]
    assert sorted(layout.local_layers(model, cfg.model)) == list(range(layout.num_list_layers(cfg.model)))
