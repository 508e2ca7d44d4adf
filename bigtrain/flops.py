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

Mixture of experts (``model.moe``): a MoE block's MLP counts what each token runs through (the active
parameters): the router ``E h``, its ``top_k`` routed SwiGLU experts ``3 h fe`` each, the shared expert
``3 h fs`` and its gate ``h``; not all ``E`` experts. Dropless routing sends every token to exactly
``top_k`` experts, so this is exact (tests/test_flops.py); with a capacity factor, dropped slots make it
an upper bound. Parameter counts (:func:`num_parameters`) hold every expert; :func:`active_parameters`
the ones a token uses. The router's softmax/top-k and the aux losses are not matmuls.

Per token, the counts do not depend on the layout. Sequence parallelism moves no matmul. Under context
parallelism (DeepSpeed-Ulysses) each of the ``context`` ranks holds ``seq/context`` positions and runs the
attention core over the whole sequence for ``heads/context`` of the heads: exactly ``1/context`` of the
square term (tests/test_flops.py). So per-GPU FLOPs are the step's tokens times the per-token count divided
by the world (tensor x context x data x pipeline), as ``hooks.log_step`` and ``planner.step_time`` do;
MFU needs no CP term. The square term grows with the sequence: for Llama-3-8B at 128k tokens it is
about 80 % of the count, and since this convention does not halve it for the causal mask (while flash
kernels skip the masked tiles), MFU at long sequences reads higher than the fraction of peak the kernels
actually run.

The bert family (``model.family: bert``, HF ``BertForPreTraining``): per block the fused QKV ``3h^2``, the
output projection ``h^2`` and a plain GELU MLP ``2 h f`` (no gate); attention is bidirectional and its
kernel computes every score, so the same full-square term as the decoder's (which does not discount the
causal half either). The MLM head runs on *every* position, as Megatron's BERT and HF compute it (the loss
then keeps the masked ones): transform ``h^2`` + decoder ``h V`` (tied to the word embedding; ``V`` is
:func:`output_vocab`, as for the decoder's output layer: the model must leave the padding rows out of the
matmul at tensor size 1, as ``OutputLayer`` does, for MFU to count what runs). Pooler
(``h^2``) and NSP (``2h``) run once per sequence, on the [CLS] token: ``(h^2 + 2h) / s`` per token.
Embedding lookups, LayerNorms, biases, GELU and tanh are not counted. Checked by hand on bert-base
(tests/test_flops.py); the parameter counts against transformers' ``BertForPreTraining``.
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


def is_encoder(m: ModelConfig) -> bool:
    """The bert family: post-LayerNorm encoder blocks with biases, a plain GELU MLP, MLM + NSP heads."""
    return m.family == "bert"


def block_parameters(m: ModelConfig, tp: int = 1, block: int = 0, ep: int = 1) -> tuple[int, ...]:
    """Elements of each parameter of block ``block`` (0-based) on one of ``tp`` tensor ranks, in module
    order: input norm, fused QKV, [its bias (qkv_bias)], [q norm, k norm (qk_norm)], attention output,
    post-attention norm, the MLP (:func:`mlp_parameters`: fused ``[gate; up]`` and down projection, or a
    MoE block's router, experts and shared expert), [attention and MLP output norms (sandwich_norms)].
    Norms are replicated over tensor ranks, the matmul weights and the QKV bias split (exactly:
    ``validate``); a MoE block's experts split over the ``ep`` expert-parallel ranks too.

    bert: fused QKV weight and bias, output projection weight and bias, LayerNorm weight and bias, MLP
    ``h -> f`` weight and bias, ``f -> h`` weight and bias, LayerNorm weight and bias (HF ``BertLayer``'s
    tensors, q/k/v fused). Column-parallel biases are split, the row-parallel ones (added after the
    all-reduce) and the norms replicated."""
    h, d, nq, f = m.hidden_size, m.head_dim, m.num_attention_heads, m.ffn_size
    if is_encoder(m):
        qkv = 3 * nq * d
        attn = (h * qkv // tp, qkv // tp, nq * d * h // tp, h)  # QKV weight and bias, output projection
        mlp = (h * f // tp, f // tp, f * h // tp, h)
        return (*attn, h, h, *mlp, h, h)
    qkv_rows = (nq + 2 * m.kv_heads) * d
    attention: tuple[int, ...] = (h * qkv_rows // tp,)
    if m.qkv_bias:
        attention += (qkv_rows // tp,)
    if m.qk_norm:
        attention += (d, d)
    out_norms = (h, h) if m.sandwich_norms else ()
    return (h, *attention, nq * d * h // tp, h, *mlp_parameters(m, tp, block, ep), *out_norms)


def mlp_parameters(m: ModelConfig, tp: int = 1, block: int = 0, ep: int = 1) -> tuple[int, ...]:
    """Elements of each MLP parameter of decoder block ``block`` on one of ``tp`` tensor and ``ep``
    expert-parallel ranks (bigtrain.models.moe names): dense, ``gate_up`` [2f/tp, h] and ``down``
    [h, f/tp]; a MoE block (``model.moe.is_moe_block``), ``router.weight`` [E, h] (replicated),
    ``experts.gate_up`` [E/ep, 2fe/tp, h], ``experts.down`` [E/ep, h, fe/tp], and with a shared expert
    its ``gate_up`` [2fs/tp, h], ``down`` [h, fs/tp] and ``shared_expert_gate`` [1, h] (replicated)."""
    h = m.hidden_size
    if not m.moe.is_moe_block(block):
        return (2 * h * m.ffn_size // tp, h * m.ffn_size // tp)
    e, fe, fs = m.moe.num_experts, m.expert_ffn_size, m.moe.shared_expert_ffn_size
    experts = (e * h, e // ep * 2 * fe // tp * h, e // ep * h * fe // tp)
    shared = (2 * h * fs // tp, h * fs // tp) if m.has_shared_expert else ()
    return (*experts, *shared, *((h,) if m.has_shared_expert_gate else ()))


def expert_parameters(m: ModelConfig, tp: int = 1, ep: int = 1) -> int:
    """Routed experts' parameters of the whole model on one of ``tp`` x ``ep`` ranks (the ones ZeRO
    shards over the expert-data-parallel group; 0 for a dense model)."""
    per_block = m.moe.num_experts // ep * 3 * m.expert_ffn_size // tp * m.hidden_size
    return sum(per_block for i in range(m.num_layers) if m.moe.is_moe_block(i))


def block_matmul_params(m: ModelConfig, block: int = 0) -> int:
    """Weights of block ``block`` that take part in a matmul per token (no norm, no bias): QKV, output
    projection, MLP (``3hf`` gated, ``2hf`` for the bert family's plain GELU MLP). A MoE block counts
    what one token runs through: the router ``Eh``, its ``top_k`` experts ``3h fe`` each, the shared
    expert ``3h fs`` and its gate ``h`` (the active parameters, not all experts)."""
    h, d, nq, f = m.hidden_size, m.head_dim, m.num_attention_heads, m.ffn_size
    attention = h * (nq + 2 * m.kv_heads) * d + nq * d * h
    if not is_encoder(m) and m.moe.is_moe_block(block):
        e = m.moe
        shared = 3 * h * e.shared_expert_ffn_size + (h if m.has_shared_expert_gate else 0)
        return attention + e.num_experts * h + e.top_k * 3 * h * m.expert_ffn_size + shared
    return attention + (2 if is_encoder(m) else 3) * h * f


def blocks_matmul_params(m: ModelConfig) -> int:
    """:func:`block_matmul_params` summed over the blocks."""
    return sum(block_matmul_params(m, i) for i in range(m.num_layers))


def embedding_parameters(m: ModelConfig, vocab_size: int, tp: int = 1) -> tuple[int, ...]:
    """Elements of each embedding tensor on one of ``tp`` tensor ranks: the vocab-parallel word embedding
    ``[vocab_size, h]``; bert adds learned positions ``[max_position_embeddings or seq_length, h]``,
    token types ``[type_vocab_size, h]`` and the embedding LayerNorm's weight and bias (replicated)."""
    h = m.hidden_size
    if is_encoder(m):
        return (vocab_size * h // tp, m.context_length * h, m.type_vocab_size * h, h, h)
    return (vocab_size * h // tp,)


def head_parameters(m: ModelConfig, vocab_size: int, tp: int = 1) -> tuple[int, ...]:
    """bert: elements of each head tensor after the blocks on one of ``tp`` tensor ranks: pooler weight
    and bias, MLM transform weight and bias, its LayerNorm weight and bias, the MLM decoder's bias
    ``[vocab_size]`` (vocab-parallel like the word embedding it is tied to, whose weight is not counted
    again), NSP weight ``[2, h]`` and bias. The pooler, transform and NSP layers are replicated.
    ValueError for a decoder (its final norm and output layer are :func:`layer_parameters` entries)."""
    if not is_encoder(m):
        raise ValueError(f"flops.head_parameters: model.family {m.family!r} has no encoder heads")
    h = m.hidden_size
    return (h * h, h, h * h, h, h, h, vocab_size // tp, 2 * h, 2)


def layer_parameters(m: ModelConfig, vocab_size: int, tp: int = 1, ep: int = 1) -> list[int]:
    """Parameters of each entry of the layer list on one of ``tp`` tensor (and ``ep`` expert-parallel)
    ranks: embedding, blocks,
    final norm, output layer (0 when tied: it reuses the embedding on the last stage). bert: embedding
    (word, position, token type, LayerNorm), blocks, pooler, heads (:func:`head_parameters`; the tied MLM
    decoder weight is the word embedding, held again by the last stage at PP > 1)."""
    h = m.hidden_size
    if is_encoder(m):  # the list's slots: embedding, blocks, the pooler (final-norm slot), the heads
        blocks = [sum(block_parameters(m, tp))] * m.num_layers
        ends = head_parameters(m, vocab_size, tp)  # the pooler's two tensors, then the heads'
        return [sum(embedding_parameters(m, vocab_size, tp)), *blocks, sum(ends[:2]), sum(ends[2:])]
    output = 0 if m.tie_embeddings else vocab_size * h // tp
    blocks = [sum(block_parameters(m, tp, i, ep)) for i in range(m.num_layers)]
    return [vocab_size * h // tp, *blocks, h, output]


def end_tensors(m: ModelConfig, vocab_size: int, tp: int = 1) -> list[int]:
    """Elements of each tensor outside the blocks on one of ``tp`` tensor ranks: the embedding's, then the
    final norm and the output layer (0 when tied), or bert's heads (ZeRO-3 persistence is per tensor)."""
    after = head_parameters(m, vocab_size, tp) if is_encoder(m) else layer_parameters(m, vocab_size, tp)[-2:]
    return [*embedding_parameters(m, vocab_size, tp), *after]


def output_matmul_params(m: ModelConfig, vocab_size: int) -> int:
    """Weights the head multiplies per token: the output layer ``h V``; bert's MLM head on every position,
    transform ``h^2`` + tied decoder ``h V``."""
    h = m.hidden_size
    return h * vocab_size + (h * h if is_encoder(m) else 0)


def matmul_params(m: ModelConfig, vocab_size: int) -> int:
    """Parameters that take part in a matmul per token (embedding lookup excluded, output layer included;
    bert: the MLM head, not the pooler and NSP layers, which run once per sequence)."""
    return blocks_matmul_params(m) + output_matmul_params(m, vocab_size)


def num_parameters(m: ModelConfig, vocab_size: int) -> int:
    """Every parameter of the model: embedding, blocks (with their two norms), final norm, output layer."""
    return sum(layer_parameters(m, vocab_size))


def active_parameters(m: ModelConfig, vocab_size: int) -> int:
    """Parameters one token runs through: :func:`num_parameters` less, in each MoE block, the
    ``num_experts - top_k`` routed experts it is not sent to (= num_parameters for a dense model)."""
    idle = (m.moe.num_experts - m.moe.top_k) * 3 * m.hidden_size * m.expert_ffn_size
    return num_parameters(m, vocab_size) - idle * sum(m.moe.is_moe_block(i) for i in range(m.num_layers))


def attention_flops_per_token(m: ModelConfig) -> float:
    """QK^T and the weighted sum of values, forward, all layers: the full ``seq x seq`` square (the
    decoder's causal half is not discounted; bert's bidirectional attention computes all of it)."""
    return 2 * 2 * m.num_layers * m.seq_length * m.num_attention_heads * m.head_dim


def sequence_flops_per_token(m: ModelConfig) -> float:
    """bert's pooler (``h -> h``) and NSP (``h -> 2``) matmuls, forward, run on the [CLS] token once per
    sequence: their FLOPs spread over its ``seq_length`` tokens. 0 for a decoder."""
    h = m.hidden_size
    return 2 * (h * h + 2 * h) / m.seq_length if is_encoder(m) else 0.0


def forward_flops_per_token(m: ModelConfig, vocab_size: int) -> float:
    """Forward FLOPs per token: ``2 x`` :func:`matmul_params`, attention, bert's per-sequence heads."""
    return 2 * matmul_params(m, vocab_size) + attention_flops_per_token(m) + sequence_flops_per_token(m)


def train_flops_per_token(m: ModelConfig, vocab_size: int) -> float:
    """Model FLOPs per trained token (what MFU counts)."""
    return 3 * forward_flops_per_token(m, vocab_size)


def recompute_flops_per_token(m: ModelConfig, vocab_size: int, checkpointing: str) -> float:
    """Forward FLOPs run again in the backward pass by activation checkpointing."""
    if checkpointing == "full":  # every block re-runs its forward; the output layer (bert: heads) does not
        return 2 * blocks_matmul_params(m) + attention_flops_per_token(m)
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
