"""Model FLOPs per token and MFU.

Convention (PaLM, Megatron): every matmul counts 2 FLOPs per multiply-add, a training step is
3x the forward (forward + 2x backward), attention scores and the weighted sum count the full
``seq x seq`` square (causal masking not discounted). Activation recomputation is *not* part of
model FLOPs (MFU); it is reported separately as hardware FLOPs.
"""

from __future__ import annotations

import torch

from bigtrain.config import ModelConfig

# Dense bf16/fp16 peak TFLOP/s by device-name fragment (most specific first).
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0))


def matmul_params(m: ModelConfig, vocab_size: int) -> int:
    """Parameters that take part in a matmul per token (embedding lookup excluded, output layer included)."""
    h, d = m.hidden_size, m.head_dim
    attn = h * (m.num_attention_heads + 2 * m.kv_heads) * d + m.num_attention_heads * d * h
    mlp = 3 * h * m.ffn_size
    return m.num_layers * (attn + mlp) + h * vocab_size


def forward_flops_per_token(m: ModelConfig, vocab_size: int) -> float:
    attention = 2 * 2 * m.num_layers * m.seq_length * m.num_attention_heads * m.head_dim  # QK^T and AV
    return 2 * matmul_params(m, vocab_size) + attention


def train_flops_per_token(m: ModelConfig, vocab_size: int) -> float:
    """Model FLOPs per trained token (what MFU counts)."""
    return 3 * forward_flops_per_token(m, vocab_size)


def hardware_flops_per_token(m: ModelConfig, vocab_size: int, checkpointing: str) -> float:
    """FLOPs actually executed, recomputation included."""
    extra = 0.0
    if checkpointing == "full":
        extra = forward_flops_per_token(m, vocab_size) - 2 * m.hidden_size * vocab_size  # blocks re-run
    elif checkpointing == "selective":
        extra = 2 * 2 * m.num_layers * m.seq_length * m.num_attention_heads * m.head_dim
    return train_flops_per_token(m, vocab_size) + extra


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak, from its name; None when unknown (CPU) and not overridden."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAK_TFLOPS:
        if fragment in name:
            return peak
    return None
