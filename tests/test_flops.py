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


def hf_bert_config(m, vocab: int, **overrides):
    """transformers' BertConfig with ``m``'s shapes and ``vocab`` word-embedding rows (``overrides`` on top)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.ffn_size,
        max_position_embeddings=m.context_length,
        type_vocab_size=m.type_vocab_size,
        hidden_act="gelu",
        layer_norm_eps=m.norm_eps,
        **overrides,
    )


def _hf_bert(m, vocab: int):
    """transformers' BertForPreTraining of ``m``'s shapes, on the meta device (shapes only)."""
    from transformers import BertForPreTraining

    with torch.device("meta"):
        return BertForPreTraining(hf_bert_config(m, vocab))


@pytest.mark.parametrize("name", ["bert-tiny", "bert-base", "bert-large"])
def test_bert_parameters_equal_transformers(name):
    """Every parameter of HF's BertForPreTraining (the tied MLM decoder counted once), its vocabulary set to
    the padded one bigtrain allocates (word-embedding rows and the MLM decoder bias both padded)."""
    from bigtrain.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / f"{name}.yaml").resolve(1)
    m, padded = cfg.model, cfg.derived.padded_vocab_size
    hf = _hf_bert(m, padded)
    assert flops.num_parameters(m, padded) == sum(p.numel() for p in hf.parameters())
    # and the true vocabulary: the padding adds (h + 1) per padded row (a word-embedding row and a bias)
    true = sum(p.numel() for p in _hf_bert(m, m.vocab_size).parameters())
    assert flops.num_parameters(m, padded) - true == (padded - m.vocab_size) * (m.hidden_size + 1)
    if name == "bert-base":  # Devlin et al.'s 110M
        assert true == 110_106_428


def test_bert_parameters_split_over_tensor_ranks():
    """At TP=2 the split tensors halve, the replicated ones (norms, row-parallel biases, position and
    token-type embeddings, pooler, MLM transform, NSP) stay whole on every rank."""
    from bigtrain.config import load_config
    from tests.conftest import REPO

    m = load_config(REPO / "configs" / "bert-base.yaml").resolve(8).model
    h, f, v = m.hidden_size, m.ffn_size, 30592
    one, two = flops.layer_parameters(m, v, 1), flops.layer_parameters(m, v, 2)
    assert len(one) == m.num_layers + 3  # embedding, blocks, pooler, heads: the model's layer list
    from bigtrain.models import layout

    for tp, counts in ((1, one), (2, two)):  # as DeepSpeed's partitioner counts them (the tied head once)
        listed = layout.list_layer_param_counts(m, v, tp)
        assert counts[:-1] == listed[:-1] and listed[-1] - counts[-1] == v * h // tp
    assert (
        one[1] - two[1] == (4 * h * h + 2 * h * f + 3 * h + f) // 2
    )  # QKV, proj, MLP weights; QKV, fc1 biases
    assert one[0] - two[0] == v * h // 2 and one[-1] - two[-1] == v // 2  # word embedding, decoder bias
    assert flops.end_tensors(m, v, 2) == [
        v * h // 2,
        512 * h,
        2 * h,
        h,
        h,
        h * h,
        h,
        h * h,
        h,
        h,
        h,
        v // 2,
        2 * h,
        2,
    ]


def test_bert_base_flops_by_hand():
    """bert-base (L 12, h 768, f 3072, s 512, vocab 30522 at TP=1), forward FLOPs per token:
    blocks 2 L (3h^2 + h^2 + 2hf) = 169,869,312; bidirectional attention, every score of the s x s square
    (as the decoder's count) 4 L s h = 18,874,368; MLM head on every position 2 (h^2 + h V) = 48,061,440;
    pooler + NSP once per sequence 2 (h^2 + 2h) / s = 2,310."""
    from bigtrain.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "bert-base.yaml").resolve(8)
    m = cfg.model
    vocab = flops.output_vocab(m, cfg.derived.padded_vocab_size, 1)
    assert vocab == 30522
    assert flops.block_matmul_params(m) == 7_077_888
    assert flops.attention_flops_per_token(m) == 18_874_368
    assert flops.sequence_flops_per_token(m) == 2_310
    forward = 169_869_312 + 18_874_368 + 48_061_440 + 2_310
    assert flops.forward_flops_per_token(m, vocab) == forward
    assert flops.train_flops_per_token(m, vocab) == 3 * forward == 710_422_290
    # full recomputation re-runs the blocks, not the heads; selective the attention core
    assert flops.recompute_flops_per_token(m, vocab, "full") == 169_869_312 + 18_874_368
    assert flops.recompute_flops_per_token(m, vocab, "selective") == 18_874_368
    # the decoder's counts of the same shapes are untouched by the bert branch (SwiGLU: 3hf)
    decoder = load_config(
        REPO / "configs" / "llama-125m.yaml", ["model.ffn_hidden_size=3072", "model.seq_length=512"]
    ).resolve(8)
    assert flops.block_matmul_params(decoder.model) == 4 * 768 * 768 + 3 * 768 * 3072
    assert flops.forward_flops_per_token(decoder.model, 30522) == (
        2 * 12 * (4 * 768 * 768 + 3 * 768 * 3072) + 18_874_368 + 2 * 768 * 30522
    )


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_context_parallel_rank_runs_its_share_of_attention_flops(cp):
    """DeepSpeed-Ulysses hands each of ``cp`` context ranks the whole sequence for heads/cp of the query
    and key/value heads: the attention core one rank runs (bigtrain's own ``Attention._attend`` at those
    shapes, counted by torch's FlopCounterMode on the math path) is 1/cp of the whole layer's, i.e.
    ``attention_flops_per_token / num_layers`` times the ``b x seq / cp`` tokens the rank holds. So per-rank
    FLOPs divide by the world (tensor x context x data) as hooks.log_step and planner.step_time divide
    them, and MFU is unchanged by the split."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from bigtrain.models.layers import TensorParallel
    from bigtrain.models.llama import Attention

    cfg = tiny_cfg("model.num_attention_heads=8", "model.num_kv_heads=4", "model.seq_length=64")
    m = cfg.model
    b, s, d = 2, m.seq_length, m.head_dim
    attention = Attention(m, TensorParallel(), recompute_core=False)
    q = torch.randn(s, b, m.num_attention_heads // cp, d)  # the whole sequence, this rank's heads
    k, v = (torch.randn(s, b, m.kv_heads // cp, d) for _ in range(2))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = attention._attend(q, k, v, None)
    assert out.shape == q.shape
    per_layer_token = flops.attention_flops_per_token(m) / m.num_layers
    assert counter.get_total_flops() == per_layer_token * b * s / cp


@pytest.mark.parametrize(
    "moe",
    [
        # Mixtral-like: every block, top-2 of 4, full recomputation (the experts run again in backward)
        (
            "model.moe.num_experts=4",
            "model.moe.top_k=2",
            "model.moe.ffn_hidden_size=48",
            "activation_checkpointing=full",
        ),
        # Qwen2-MoE-like: every other block, top-1 of 3, a gated shared expert
        (
            *("model.moe.num_experts=3", "model.moe.top_k=1", "model.moe.layer_freq=2", "model.num_layers=4"),
            *(
                "model.moe.shared_expert_ffn_size=40",
                "model.moe.shared_expert_gate=true",
                "model.moe.norm_topk_prob=false",
            ),
        ),
    ],
)
def test_moe_flops_count_active_experts(world_of_one, moe):  # noqa: F811
    """Dropless routing: every token runs the router and exactly top_k experts' SwiGLU (+ the shared
    expert), whatever experts it picks: FlopCounterMode on the model equals the active-parameter count;
    the parameter count holds every expert."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from bigtrain.distributed import init_distributed

    get_moe_layer_wise_logging_tracker().clear()  # megatron sizes it by the first model's layers
    cfg = tiny_cfg("model.ffn_hidden_size=96", *moe)
    init_distributed(cfg)
    m, padded = cfg.model, cfg.derived.padded_vocab_size
    vocab = flops.output_vocab(m, padded, cfg.parallel.tensor)
    fwd, bwd, params = _count(cfg)
    tokens = 2 * m.seq_length
    assert fwd == flops.forward_flops_per_token(m, vocab) * tokens
    assert fwd + bwd == flops.hardware_flops_per_token(m, vocab, cfg.activation_checkpointing) * tokens
    assert params == flops.num_parameters(m, padded)
    # by hand: attention 2*(h*(nq+2kv)d + nq d h) + per MoE block router E h + top_k * 3 h fe (+ shared)
    h, e = m.hidden_size, m.moe
    attention = h * (4 + 2 * 2) * 16 + 4 * 16 * h
    shared = 3 * h * e.shared_expert_ffn_size + (h if e.shared_expert_gate else 0)
    moe_block = attention + e.num_experts * h + e.top_k * 3 * h * m.expert_ffn_size + shared
    dense_block = attention + 3 * h * 96
    n_moe = sum(e.is_moe_block(i) for i in range(m.num_layers))
    assert (
        flops.matmul_params(m, vocab) == n_moe * moe_block + (m.num_layers - n_moe) * dense_block + h * vocab
    )
    idle = n_moe * (e.num_experts - e.top_k) * 3 * h * m.expert_ffn_size
    assert flops.active_parameters(m, padded) == params - idle
    assert idle > 0


def test_moe_parameters_split_over_expert_ranks():
    """Expert weights split over ep (and tp) ranks; the router and norms stay whole: the per-rank
    counts add back to the model's."""
    cfg = tiny_cfg("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=48")
    m, v = cfg.model, cfg.derived.padded_vocab_size
    one = flops.layer_parameters(m, v, 1, 1)
    two = flops.layer_parameters(m, v, 1, 2)
    experts = flops.expert_parameters(m)
    assert experts == m.num_layers * 4 * 3 * 48 * m.hidden_size
    assert flops.expert_parameters(m, 1, 2) == experts // 2
    assert sum(one) - sum(two) == experts // 2
    assert sum(flops.layer_parameters(m, v, 2, 2)) < sum(two)
