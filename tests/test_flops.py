"""bigtrain.flops against an independent count: torch's FlopCounterMode on bigtrain's own model."""

from __future__ import annotations

import pytest
import torch

from bigtrain import flops
from tests.models.test_layout import tiny_cfg, world_of_one  # noqa: F401  (fixture)


def _count(cfg) -> tuple[int, int, int]:
    """(forward FLOPs, backward FLOPs incl. recomputation, parameters) for one micro-batch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.checkpoint import set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode

    from bigtrain.registry import build_model

    model = build_model(cfg)
    b, s = 2, cfg.model.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    # The math backend is plain bmm's, which the counter sees (CPU flash kernels are not registered).
    # No early stop: a recomputed attention core then re-runs whole, as the fused flash kernel does on
    # GPU (with early stop torch skips the math path's last bmm, whose output backward never needs).
    with sdpa_kernel(SDPBackend.MATH), set_checkpoint_early_stop(False):
        with FlopCounterMode(display=False) as fwd:
            loss = model(tokens, tokens, torch.ones(b, s))
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops(), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("checkpointing,tie", [("none", False), ("selective", False), ("full", True)])
def test_flops_equal_torch_flop_counter(world_of_one, checkpointing, tie):  # noqa: F811
    from bigtrain.distributed import init_distributed

    # GQA (4 query heads, 2 kv groups), a SwiGLU width that is not 8/3*h, padded vocab (300 -> 384)
    cfg = tiny_cfg(
        "model.ffn_hidden_size=96",
        f"activation_checkpointing={checkpointing}",
        f"model.tie_embeddings={str(tie).lower()}",
    )
    init_distributed(cfg)
    m, padded = cfg.model, cfg.derived.padded_vocab_size
    vocab = flops.output_vocab(m, padded, cfg.parallel.tensor)
    assert vocab == 300  # tensor size 1: the output layer multiplies the true vocabulary only
    tokens = 2 * m.seq_length
    fwd, bwd, params = _count(cfg)
    assert fwd == flops.forward_flops_per_token(m, vocab) * tokens
    assert fwd + bwd == flops.hardware_flops_per_token(m, vocab, checkpointing) * tokens
    assert flops.train_flops_per_token(m, vocab) == 3 * flops.forward_flops_per_token(m, vocab)
    assert params == flops.num_parameters(m, padded)
    if checkpointing == "none":
        assert bwd == 2 * fwd  # the 3x convention holds exactly for the model FLOPs


@pytest.mark.parametrize(
    "variant",
    [
        ("model.hf_model_type=qwen2", "model.qkv_bias=true", "model.sliding_window=8"),
        ("model.hf_model_type=qwen3", "model.qk_norm=true", "model.kv_channels=32"),
        (
            *("model.hf_model_type=gemma2", "model.norm_offset=true", "model.sandwich_norms=true"),
            *("model.scale_embeddings=true", "model.activation=gelu_tanh", "model.attn_logit_softcapping=50"),
            *("model.final_logit_softcapping=30", "model.sliding_window=8", "model.window_pattern=2"),
        ),
    ],
)
def test_variant_flops_and_parameters(world_of_one, variant):  # noqa: F811
    """Biases and q/k norms are parameters but no matmul; a head width of its own changes the QKV and
    attention counts; a sliding window (an SDPA mask) leaves every score computed, and so does Gemma's
    soft-capped math attention (the same two matmuls)."""
    from bigtrain.distributed import init_distributed

    cfg = tiny_cfg("model.ffn_hidden_size=96", *variant)
    init_distributed(cfg)
    m, padded = cfg.model, cfg.derived.padded_vocab_size
    vocab = flops.output_vocab(m, padded, cfg.parallel.tensor)
    fwd, bwd, params = _count(cfg)
    assert fwd == flops.forward_flops_per_token(m, vocab) * 2 * m.seq_length
    assert bwd == 2 * fwd
    assert params == flops.num_parameters(m, padded)
    assert sum(flops.block_parameters(m)) > flops.block_matmul_params(m) + 2 * m.hidden_size  # bias/norms


def test_flops_scale_like_6n_for_a_big_model():
    """1.3B preset: ~6N per token plus the attention term (sanity against the usual rule of thumb)."""
    from bigtrain.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "llama-1.3b.yaml").resolve(8)
    m, vocab = cfg.model, cfg.derived.padded_vocab_size
    n = flops.matmul_params(m, vocab)
    attn = 12 * m.num_layers * m.hidden_size * m.seq_length
    assert flops.train_flops_per_token(m, vocab) == pytest.approx(6 * n + attn, rel=1e-12)
    assert 1.2e9 < flops.num_parameters(m, vocab) < 1.5e9


def test_peak_from_device_name_and_override():
    assert flops.peak_from_name("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_from_name("NVIDIA H200") == 989.0
    assert flops.peak_from_name("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_from_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_from_name("NVIDIA GeForce GTX 1080") is None
    assert flops.peak_tflops(torch.device("cpu")) is None
    assert flops.peak_tflops(torch.device("cpu"), override=123.0) == 123.0
