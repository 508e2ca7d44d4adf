"""The MoE block (bigtrain.models.moe) against transformers' Mixtral and Qwen2-MoE sparse blocks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from bigtrain.config import ModelConfig, MoEConfig
from bigtrain.models.layers import TensorParallel
from bigtrain.models.llama import SwiGLU
from bigtrain.models.moe import MoE
from tests.conftest import REPO, cpu_env

E, K, H, F = 8, 2, 16, 24


def _model(**moe: object) -> ModelConfig:
    return ModelConfig(
        hidden_size=H,
        num_attention_heads=2,
        num_layers=1,
        ffn_hidden_size=F,
        vocab_size=64,
        moe=MoEConfig(num_experts=E, top_k=K, aux_loss_coeff=0.01, **moe),  # type: ignore[arg-type]
    )


def _hf_block(family: str) -> tuple[torch.nn.Module, ModelConfig]:
    if family == "mixtral":
        hc = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
        return MixtralSparseMoeBlock(hc), _model()
    hc = Qwen2MoeConfig(
        hidden_size=H,
        moe_intermediate_size=F,
        shared_expert_intermediate_size=20,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=False,
    )
    return Qwen2MoeSparseMoeBlock(hc), _model(
        norm_topk_prob=False, shared_expert_ffn_size=20, shared_expert_gate=True
    )


@torch.no_grad()
def _copy_hf(ours: MoE, hf: torch.nn.Module) -> None:
    sd = dict(hf.named_parameters())
    ours.router.weight.copy_(sd["gate.weight"])
    ours.experts.gate_up.copy_(sd["experts.gate_up_proj"])  # [experts, 2f, h]: gate rows, then up rows
    ours.experts.down.copy_(sd["experts.down_proj"])
    if ours.shared_expert is not None:
        gate_up = torch.cat([sd["shared_expert.gate_proj.weight"], sd["shared_expert.up_proj.weight"]])
        ours.shared_expert.gate_up.weight.copy_(gate_up)
        ours.shared_expert.down.weight.copy_(sd["shared_expert.down_proj.weight"])
        assert ours.shared_expert_gate is not None
        ours.shared_expert_gate.weight.copy_(sd["shared_expert_gate.weight"])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_block_equals_transformers_block_and_its_aux_loss(family: str) -> None:
    torch.manual_seed(0)
    hf, m = _hf_block(family)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = MoE(m, TensorParallel(), block=0, dense_mlp=SwiGLU)
    _copy_hf(ours, hf)
    x = torch.randn(2, 7, H)  # [b, s, h]
    expected = hf(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    clear_aux_losses_tracker()
    ours.train()
    out = ours(x.transpose(0, 1).contiguous()).transpose(0, 1)  # ours is [s, b, h]
    assert (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    # the load-balancing loss HF computes from this block's router logits (one block: no pooling)
    logits = torch.nn.functional.linear(x.reshape(-1, H), hf.gate.weight)
    hf_aux = load_balancing_loss_func((logits,), E, K).item()
    recorded = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0].item() * K
    assert recorded == pytest.approx(hf_aux, rel=1e-5)
    assert hf_aux > 1.0  # E * sum f*P is 1 at perfect balance: a real value, not a default
    # the aux gradient reaches the router: with the coefficient, the router's gradient changes
    out.sum().backward()
    with_aux = ours.router.weight.grad.clone()
    ours.zero_grad()
    ours.config.moe_aux_loss_coeff = 0.0
    ours.router.config.moe_aux_loss_coeff = 0.0
    ours(x.transpose(0, 1).contiguous()).sum().backward()
    assert not torch.allclose(with_aux, ours.router.weight.grad)


def test_renormalization_is_what_distinguishes_mixtral_from_qwen() -> None:
    """The control: Qwen2-MoE's block (no renormalization) run with Mixtral's routing differs."""
    torch.manual_seed(1)
    hf, m = _hf_block("qwen2_moe")
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    wrong = MoE(
        _model(norm_topk_prob=True, shared_expert_ffn_size=20, shared_expert_gate=True),
        TensorParallel(),
        block=0,
        dense_mlp=SwiGLU,
    )
    _copy_hf(wrong, hf)
    x = torch.randn(2, 7, H)
    expected = hf(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    out = wrong(x.transpose(0, 1).contiguous()).transpose(0, 1)
    assert (out - expected).abs().max().item() > 1e-3


def test_megatron_moe_needs_the_patch_on_cpu() -> None:
    """megatron-core's MoE layer, unpatched, cannot route on a CPU-only process; with
    ``compat.megatron_moe_on`` it runs (the EP2 dispatch itself: tests/training/test_moe_parallel.py)."""
    script = textwrap.dedent(
        """
        import sys, torch
        from bigtrain.config import ModelConfig, MoEConfig
        from bigtrain.models.layers import TensorParallel
        from bigtrain.models import moe
        from bigtrain.models.llama import SwiGLU
        from bigtrain import compat
        if sys.argv[1] == "off":
            compat.megatron_moe_on = lambda device: None
            moe.compat.megatron_moe_on = compat.megatron_moe_on
        m = ModelConfig(hidden_size=16, num_attention_heads=2, num_layers=1, ffn_hidden_size=24, vocab_size=64,
                        moe=MoEConfig(num_experts=4, top_k=2))
        layer = moe.MoE(m, TensorParallel(), 0, SwiGLU)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.1)
        print("out", layer(torch.randn(3, 2, 16)).shape)
        """
    )
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", script, mode],
            cwd=REPO,
            env=cpu_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        for mode in ("on", "off")
    }
    assert runs["on"].returncode == 0, runs["on"].stderr[-2000:]
    assert "out torch.Size([3, 2, 16])" in runs["on"].stdout
    assert runs["off"].returncode != 0
    # the first CUDA assumption met: the dispatcher's side stream
    assert "torch.cuda.Stream requires CUDA support" in runs["off"].stderr


def test_capacity_factor_drops_tokens_past_each_experts_capacity() -> None:
    """capacity = factor * tokens * top_k / experts (megatron rounds up): no expert computes more tokens
    than that, and a token whose every choice was dropped gets no routed output (residual only)."""
    torch.manual_seed(2)
    tokens = 28  # [s=14, b=2]
    m = _model(capacity_factor=0.25)  # 0.25 * 28 * 2 / 8 = 1.75 -> 2 tokens per expert
    layer = MoE(m, TensorParallel(), block=0, dense_mlp=SwiGLU)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    seen: list[list[int]] = []
    layer.experts.register_forward_hook(lambda mod, args, out: seen.append(args[1].tolist()))
    out = layer(torch.randn(14, 2, H)).reshape(tokens, H)
    capacity = 2
    assert max(seen[0]) <= capacity and sum(seen[0]) <= E * capacity < tokens * K
    silent = (out.abs().sum(-1) == 0).sum().item()
    assert silent >= tokens - E * capacity  # at most E * capacity tokens can keep any expert
    dropless = MoE(_model(), TensorParallel(), block=0, dense_mlp=SwiGLU)
    dropless.load_state_dict(layer.state_dict())
    seen.clear()
    dropless.experts.register_forward_hook(lambda mod, args, out: seen.append(args[1].tolist()))
    dropless(torch.randn(14, 2, H))
    assert sum(seen[0]) == tokens * K  # dropless: every token reaches its top-k experts
