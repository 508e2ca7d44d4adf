"""The decoder's config-driven variants in isolation: rotary scaling tables against transformers' rope
init functions (read from both HF schemas), the config's checks, and the sliding window through packed
(document-masked) attention and the KV cache. End-to-end parity per family: tests/tools/test_variants.py."""

from __future__ import annotations

import pytest
import torch

from bigtrain.config import ConfigError, config_from_dict
from bigtrain.models import layout
from bigtrain.models.layers import Rotary, rope_frequencies, rotary_tables
from tests.models.test_layout import tiny_cfg

HEAD_DIM, THETA, CONTEXT = 64, 500000.0, 131072
ROPE = {  # name -> (HF rope settings, transformers 5 rope_parameters form)
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {  # Llama 3.1/3.2/3.3
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen2.5 long
    "yarn-deepseek": {  # DeepSeek-V3 style: mscale ratio, own betas
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
    },
    "yarn-untruncated": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 4096,
        "attention_factor": 1.25,
        "truncate": False,
    },
}


def hf_llama_config(rope: dict, schema: str) -> dict:
    """A Llama config.json with ``rope`` in the old (``rope_scaling`` + ``rope_theta``, ``type`` key) or
    the new (``rope_parameters`` with the theta inside) schema."""
    base = {
        "model_type": "llama",
        "hidden_size": HEAD_DIM * 4,
        "num_attention_heads": 4,
        "max_position_embeddings": CONTEXT,
        "vocab_size": 300,
    }
    if schema == "new":
        return {**base, "rope_parameters": {**rope, "rope_theta": THETA}}
    old = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
    return {**base, "rope_scaling": old, "rope_theta": THETA}


@pytest.mark.parametrize("schema", ["old", "new"])
@pytest.mark.parametrize("name", sorted(ROPE))
def test_rotary_scaling_equals_transformers_rope_init(name, schema):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = hf_llama_config(ROPE[name], schema)
    cfg = config_from_dict({"model": layout.model_values_from_hf(hf), "data": {"mock": True}}).resolve(1)
    rot = Rotary.of(cfg.model)
    assert dict(rot.scaling)["type"] == ROPE[name]["rope_type"] and rot.theta == THETA
    ours, our_factor = rope_frequencies(rot)
    hf_config = LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    theirs, their_factor = ROPE_INIT_FUNCTIONS[ROPE[name]["rope_type"]](hf_config, torch.device("cpu"))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(their_factor, rel=1e-12)
    plain, _ = rope_frequencies(Rotary(HEAD_DIM, THETA))
    assert (ours / plain - 1).abs().max() > 0.5  # scaling changes the table (some frequencies by >= 2x)
    # the export writes the same settings back (rope_parameters, theta inside)
    assert layout.hf_rope_parameters(cfg.model) == {**ROPE[name], "rope_theta": THETA}
    cos, sin = rotary_tables(16, rot, torch.device("cpu"))
    positions = torch.arange(16.0)[:, None] * theirs[None, :]
    torch.testing.assert_close(cos[:, : HEAD_DIM // 2], positions.cos() * their_factor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sin[:, HEAD_DIM // 2 :], positions.sin() * their_factor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.rope_scaling.type=dynamic"], "dynamic NTK only rescales at inference"),
        (
            ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8"],
            "llama3 needs 0 < low_freq_factor",
        ),
        (
            ["model.rope_scaling.type=linear", "model.rope_scaling.beta_fast=32"],
            "beta_fast is a yarn setting",
        ),
        (["model.rope_scaling.factor=0.5"], "factor must be >= 1"),
        (["model.qkv_bias=true"], "model.qkv_bias needs model.hf_model_type qwen2"),
        (["model.qk_norm=true"], "model.qk_norm needs model.hf_model_type qwen3"),
        (["model.sliding_window=8"], "HF's llama has no sliding window"),
        (["model.hf_model_type=mistral", "model.sliding_window=0"], "model.sliding_window must be > 0"),
        (
            ["model.hf_model_type=gemma3"],
            "model.hf_model_type must be llama|mistral|qwen2|qwen3|phi3|gemma2|gemma3_text",
        ),
        (["model.kv_channels=7"], "model head width 7 must be even"),
        (["model.norm_offset=true"], "model.norm_offset is Gemma's block"),
        (["model.hf_model_type=gemma2"], "model.norm_offset is Gemma's block"),
        (["model.rope_local_theta=10000"], "model.rope_local_theta needs model.hf_model_type gemma3_text"),
        (
            ["model.final_logit_softcapping=30"],
            "model.final_logit_softcapping needs model.hf_model_type gemma2",
        ),
        (
            [
                *("model.hf_model_type=gemma2", "model.norm_offset=true", "model.sandwich_norms=true"),
                *(
                    "model.scale_embeddings=true",
                    "model.activation=gelu_tanh",
                    "model.attn_logit_softcapping=0",
                ),
            ],
            "model.attn_logit_softcapping must be > 0",
        ),  # fmt: skip
        (["model.activation=relu"], "model.activation must be silu|gelu_tanh"),
    ],
)
def test_variant_config_checks_name_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_cfg(*overrides)


def test_unknown_rope_scaling_key_is_rejected():
    with pytest.raises(ConfigError, match="unknown config key model.rope_scaling.short_factor"):
        config_from_dict({"model": {"rope_scaling": {"type": "yarn", "short_factor": [1.0]}}})


def test_head_width_of_its_own_needs_no_divisible_hidden():
    m = tiny_cfg("model.hidden_size=60", "model.kv_channels=32").model  # 60 / 4 heads is 15
    assert m.head_dim == 32 and layout.full_shape(layout.LAYER_PARAMS[layout.BLOCK][1], m, 0) == (8 * 32, 60)


WINDOW = ("model.hf_model_type=mistral", "model.sliding_window=4")
QWEN3 = ("model.hf_model_type=qwen3", "model.qk_norm=true", "model.kv_channels=32")
GEMMA2 = (
    *("model.hf_model_type=gemma2", "model.norm_offset=true", "model.sandwich_norms=true"),
    *("model.scale_embeddings=true", "model.activation=gelu_tanh", "model.query_pre_attn_scalar=24"),
    *("model.attn_logit_softcapping=5", "model.final_logit_softcapping=3", "model.sliding_window=4"),
    "model.window_pattern=2",
)


def small_model(*overrides: str):
    from bigtrain.registry import build_model

    cfg = tiny_cfg("model.seq_length=24", *overrides)
    return build_model(cfg).eval(), cfg


def test_window_holds_in_packed_attention():
    """Two documents packed in one row attend each within itself and within the window: each one's
    outputs equal the document run alone (a mask that ignored documents or the window would differ)."""
    from bigtrain.finetune.model import PackedBlock

    model, cfg = small_model(*WINDOW)
    block = model.blocks[0]
    assert block.attention.window == 4
    packed = PackedBlock(cfg.model, _tp(), window=4)
    packed.load_state_dict(block.state_dict())
    x = torch.randn(24, 1, cfg.model.hidden_size, generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14])
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        out, _, _ = packed((x, positions, doc_ids))
        alone = torch.cat([block(x[:10]), block(x[10:])])
        unwindowed = PackedBlock(cfg.model, _tp())
        unwindowed.load_state_dict(block.state_dict())
        wrong, _, _ = unwindowed((x, positions, doc_ids))
    torch.testing.assert_close(out, alone, rtol=0, atol=1e-6)
    assert (wrong - alone).abs().max() > 1e-3


def _tp():
    from bigtrain.models.layers import TensorParallel

    return TensorParallel()


@pytest.mark.parametrize("variant", [WINDOW, (*QWEN3, "model.sliding_window=4"), GEMMA2])
def test_kv_cache_chunks_equal_full_forward(variant):
    """Cached decoding over 24 positions (window 4: the cache holds more than the window attends to;
    Gemma 2: soft-capped scores through the math path, every other block windowed)."""
    from bigtrain.models.layers import KVCache

    model, cfg = small_model(*variant)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.outputs(tokens)
        cache = [KVCache(24) for _ in model.blocks]
        pieces = [model.outputs(tokens[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 15), (15, 24))]
    torch.testing.assert_close(torch.cat(pieces), full, rtol=0, atol=1e-5)
