"""Model FLOPs per token and MFU.

Convention (PaLM, Megatron): every matmul counts 2 FLOPs per multiply-add, a training step is
3x the forward (forward + 2x backward), attention scores and the weighted sum count the full
``seq x seq`` square (causal masking not discounted). Activation recomputation is *not* part of
model FLOPs (MFU); it is reported separately as hardware FLOPs. Embedding lookups, norms,
activations and the softmax are not matmuls and are not counted.

``vocab_size`` is the vocabulary the output layer multiplies (:func:`output_vocab`): the padded one
at tensor size > 1, the true one at size 1 (bigtrain.models.llama.OutputLayer leaves the padding out).
Variants: q/k/v biases and q/k norm weights are parameters but not matmul weights (adds and norms are
not counted); the head width is ``model.head_dim`` (``kv_channels``). A sliding window does not reduce
the count: bigtrain applies it as an SDPA mask, so the kernel still computes every ``seq x seq`` score
(as with the causal mask), and MFU stays comparable with the full-attention model.
The counts are exact against ``torch.utils.flop_counter`` on bigtrain's model (tests/test_flops.py).
"""

from __future__ import annotations

import torch

from bigtrain.config import ModelConfig

# Dense bf16/fp16 peak TFLOP/s (no sparsity) by device-name fragment, most specific first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
)


def output_vocab(m: ModelConfig, padded_vocab: int, tensor: int) -> int:
    """Rows of the output layer's matmul: the true vocabulary at tensor size 1, else the padded one."""
    if m.vocab_size is None:
        raise ValueError("flops.output_vocab: model.vocab_size is not set (resolve the config first)")
    return m.vocab_size if tensor == 1 else padded_vocab


def block_parameters(m: ModelConfig, tp: int = 1) -> tuple[int, ...]:
    """Elements of each parameter of one transformer block on one of ``tp`` tensor ranks, in module
    order: input norm, fused QKV, [its bias (qkv_bias)], [q norm, k norm (qk_norm)], attention output,
    post-attention norm, fused ``[gate; up]``, down projection, [attention and MLP output norms
    (sandwich_norms)]. Norms are replicated over tensor ranks,
    the matmul weights and the QKV bias split (exactly: ``validate``)."""
    h, d, nq, f = m.hidden_size, m.head_dim, m.num_attention_heads, m.ffn_size
    qkv_rows = (nq + 2 * m.kv_heads) * d
    attention: tuple[int, ...] = (h * qkv_rows // tp,)
    if m.qkv_bias:
        attention += (qkv_rows // tp,)
    if m.qk_norm:
        attention += (d, d)
    out_norms = (h, h) if m.sandwich_norms else ()
    return (h, *attention, nq * d * h // tp, h, 2 * h * f // tp, h * f // tp, *out_norms)


def block_matmul_params(m: ModelConfig) -> int:
    """Weights of one transformer block that take part in a matmul (no norm, no bias)."""
    h, d, nq, f = m.hidden_size, m.head_dim, m.num_attention_heads, m.ffn_size
    return h * (nq + 2 * m.kv_heads) * d + nq * d * h + 3 * h * f


def layer_parameters(m: ModelConfig, vocab_size: int, tp: int = 1) -> list[int]:
    """Parameters of each entry of the layer list on one of ``tp`` tensor ranks: embedding, blocks,
    final norm, output layer (0 when tied: it reuses the embedding on the last stage)."""
    h = m.hidden_size
    output = 0 if m.tie_embeddings else vocab_size * h // tp
    return [vocab_size * h // tp, *[sum(block_parameters(m, tp))] * m.num_layers, h, output]


def matmul_params(m: ModelConfig, vocab_size: int) -> int:
    """Parameters that take part in a matmul per token (embedding lookup excluded, output layer included)."""
    return m.num_layers * block_matmul_params(m) + m.hidden_size * vocab_size


def num_parameters(m: ModelConfig, vocab_size: int) -> int:
    """Every parameter of the model: embedding, blocks (with their two norms), final norm, output layer."""
    return sum(layer_parameters(m, vocab_size))


def attention_flops_per_token(m: ModelConfig) -> float:
    """QK^T and the weighted sum of values, forward, all layers (full square)."""
    return 2 * 2 * m.num_layers * m.seq_length * m.num_attention_heads * m.head_dim


def forward_flops_per_token(m: ModelConfig, vocab_size: int) -> float:
    return 2 * matmul_params(m, vocab_size) + attention_flops_per_token(m)


def train_flops_per_token(m: ModelConfig, vocab_size: int) -> float:
    """Model FLOPs per trained token (what MFU counts)."""
    return 3 * forward_flops_per_token(m, vocab_size)


def recompute_flops_per_token(m: ModelConfig, vocab_size: int, checkpointing: str) -> float:
    """Forward FLOPs run again in the backward pass by activation checkpointing."""
    if checkpointing == "full":  # every block re-runs its forward; the output layer does not
        return forward_flops_per_token(m, vocab_size) - 2 * m.hidden_size * vocab_size
    if checkpointing == "selective":  # only the attention core (one fused kernel re-run on GPU)
        return attention_flops_per_token(m)
    return 0.0


def hardware_flops_per_token(m: ModelConfig, vocab_size: int, checkpointing: str) -> float:
    """FLOPs actually executed, recomputation included."""
    return train_flops_per_token(m, vocab_size) + recompute_flops_per_token(m, vocab_size, checkpointing)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak, from its name; None when unknown (CPU) and not overridden."""
    if override:
        return override
    if device.type != "cuda":
        return None
    return peak_from_name(torch.cuda.get_device_name(device))


def peak_from_name(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s for a CUDA device name (``torch.cuda.get_device_name``), None if unknown."""
    for fragment, peak in PEAK_TFLOPS:
        if fragment in name:
            return peak
    return None
