"""Llama-architecture decoder as a flat list of layers: embedding, N blocks, final norm, output layer.

Linear layers, the embedding and the loss are megatron-core's tensor-parallel ones; everything else is
plain torch. Activations are ``[seq, batch, hidden]`` (megatron's convention). The same layer classes
become a DeepSpeed ``PipelineModule`` or a plain module in :mod:`bigtrain.models.parallelize`; this file
only describes the architecture. Attribute names match :mod:`bigtrain.models.layout`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain.config import ModelConfig
from bigtrain.perf import compile_enabled, compiled


def _no_init(weight: torch.Tensor) -> None:
    """Weights are filled by bigtrain.models.layout (layout-independent init), not by megatron."""


def column_parallel(in_size: int, out_size: int, mp: ModelParallelConfig) -> ColumnParallelLinear:
    """Bias-free linear with its output features split over tensor ranks (output stays split)."""
    return ColumnParallelLinear(
        in_size, out_size, config=mp, init_method=_no_init, bias=False, gather_output=False
    )


def row_parallel(in_size: int, out_size: int, mp: ModelParallelConfig) -> RowParallelLinear:
    """Bias-free linear with its input features split over tensor ranks (output all-reduced)."""
    return RowParallelLinear(
        in_size,
        out_size,
        config=mp,
        init_method=_no_init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
    )


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 like HF's LlamaRMSNorm (so exports match to the last bit)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@compiled
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotary_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """cos/sin for rotate-half rotary embeddings (HF Llama / megatron non-interleaved convention).
    Cached: every block of every step asks for the same tables (8 small kernels each otherwise)."""
    return _rotary_tables(seq_len, head_dim, theta, torch.device(device), torch.is_inference_mode_enabled())


@functools.lru_cache(maxsize=16)
def _rotary_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device, inference: bool
) -> tuple[torch.Tensor, ...]:
    # ``inference`` keys the cache: tensors made under inference_mode cannot be saved for backward
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    )
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, d]
    return emb.cos(), emb.sin()


@compiled
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [s, b, heads, d]; cos/sin: [s, d]."""
    cos, sin = cos[:, None, None, :].to(x.dtype), sin[:, None, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """One block's keys and values for incremental decoding (inference only; see bigtrain.generation).

    Buffers ``[b, groups, max_length, d]`` are allocated at the first append; ``length`` positions are
    filled. Attention over the cache uses SDPA like training; the causal mask is offset by the cached
    length (a single new position attends to everything, so it needs none)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values [b, groups, s, d]; returns all of them so far."""
        if self.k is None:
            shape = (*k.shape[:2], self.max_length, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} requested")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, heads, s, d] are the last s positions of k/v [b, groups, t, d]."""
        s, t = q.shape[2], k.shape[2]
        mask = None
        if s > 1:
            mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(diagonal=t - s)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class Attention(nn.Module):
    """Grouped-query causal self-attention; the core runs in SDPA (flash kernels on GPU)."""

    def __init__(self, m: ModelConfig, mp: ModelParallelConfig, recompute_core: bool):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.head_dim = m.head_dim
        self.kv_groups = m.kv_heads // tp  # key/value groups on this rank
        self.q_per_group = m.num_attention_heads // m.kv_heads
        self.rope_theta = m.rope_theta
        self.recompute_core = recompute_core
        qkv_out = (m.num_attention_heads + 2 * m.kv_heads) * m.head_dim
        self.qkv = column_parallel(m.hidden_size, qkv_out, mp)
        self.proj = row_parallel(m.num_attention_heads * m.head_dim, m.hidden_size, mp)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [b, heads, s, d] -> [b, heads, s, d]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``cache`` (inference only): keys/values of earlier positions; x holds the positions after them.
        ``positions``/``doc_ids`` [b, s] (packed fine-tuning sequences): rotary positions restart per
        document and attention stays within a document (causal and same doc id)."""
        if positions is not None:
            return self._packed(x, positions, doc_ids)
        s, b, _ = x.shape
        qkv, _ = self.qkv(x)  # [s, b, groups*(q_per_group+2)*d]
        qkv = qkv.view(s, b, self.kv_groups, self.q_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_group].reshape(s, b, -1, self.head_dim)  # [s, b, heads, d]
        k = qkv[:, :, :, self.q_per_group]  # [s, b, groups, d]
        v = qkv[:, :, :, self.q_per_group + 1]
        start = 0 if cache is None else cache.length
        cos, sin = rotary_tables(start + s, self.head_dim, self.rope_theta, x.device)
        q, k = apply_rotary(q, cos[start:], sin[start:]), apply_rotary(k, cos[start:], sin[start:])
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        if cache is not None:
            k, v = cache.append(k, v)
        if start:
            out = cache.attend(q, k, v)
        elif self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, use_reentrant=False)
        else:
            out = self._core(q, k, v)
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, heads*d]
        return self.proj(out)[0]

    def _packed(self, x: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        s, b, _ = x.shape
        qkv, _ = self.qkv(x)
        qkv = qkv.view(s, b, self.kv_groups, self.q_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_group].reshape(s, b, -1, self.head_dim)  # [s, b, heads, d]
        k, v = qkv[:, :, :, self.q_per_group], qkv[:, :, :, self.q_per_group + 1]  # [s, b, groups, d]
        cos, sin = rotary_tables(s, self.head_dim, self.rope_theta, x.device)  # positions restart below s
        pos = positions.t()  # [s, b]
        cos, sin = cos[pos][:, :, None].to(x.dtype), sin[pos][:, :, None].to(x.dtype)  # [s, b, 1, d]

        def rotate(t: torch.Tensor) -> torch.Tensor:
            t1, t2 = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-t2, t1], dim=-1) * sin

        q, k = rotate(q), rotate(k)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]  # [b, 1, s, s]
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(_masked_core, q, k, v, mask, use_reentrant=False)
        else:
            out = _masked_core(q, k, v, mask)
        return self.proj(out.permute(2, 0, 1, 3).reshape(s, b, -1))[0]  # [s, b, heads*d]


def _masked_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class SwiGLU(nn.Module):
    def __init__(self, m: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.gate_up = column_parallel(m.hidden_size, 2 * m.ffn_size, mp)
        self.down = row_parallel(m.ffn_size, m.hidden_size, mp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)[0].chunk(2, dim=-1)  # this rank's [gate_r; up_r]
        return self.down(swiglu(gate, up))[0]


@compiled
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class TransformerBlock(nn.Module):
    """Pre-norm block; ``checkpointing``: none | full (recompute the block) | selective (attention core)."""

    def __init__(self, m: ModelConfig, mp: ModelParallelConfig, checkpointing: str = "none"):
        super().__init__()
        self.full_recompute = checkpointing == "full"
        self.input_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.attention = Attention(m, mp, recompute_core=checkpointing == "selective")
        self.post_attention_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.mlp = SwiGLU(m, mp)

    def _forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.input_norm(x), cache, positions, doc_ids)
        return x + self.mlp(self.post_attention_norm(x))

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``positions``/``doc_ids`` [b, s]: packed sequences (see Attention.forward)."""
        if self.full_recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, None, positions, doc_ids, use_reentrant=False)
        return self._forward(x, cache, positions, doc_ids)


class Embedding(nn.Module):
    """Token ids [b, s] -> hidden [s, b, h]."""

    def __init__(self, m: ModelConfig, mp: ModelParallelConfig, padded_vocab: int):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab, m.hidden_size, init_method=_no_init, config=mp
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(tokens.t().contiguous())


class FinalNorm(RMSNorm):
    def __init__(self, m: ModelConfig):
        super().__init__(m.hidden_size, m.norm_eps)


class OutputLayer(nn.Module):
    """hidden [s, b, h] -> this rank's vocab slice of the logits [s, b, v/tp], padding masked out.

    With tied embeddings the weight is the embedding's, passed in at call time (PP=1) or shared by
    DeepSpeed's TiedLayerSpec (PP>1).
    """

    def __init__(self, m: ModelConfig, mp: ModelParallelConfig, padded_vocab: int, tied: bool):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        # megatron's column-parallel matmul, fed an explicit weight: ours, or the embedding's when tied.
        self.linear = ColumnParallelLinear(
            m.hidden_size,
            padded_vocab,
            config=mp,
            init_method=_no_init,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=True,
        )
        if not tied:
            self.weight = nn.Parameter(torch.empty(padded_vocab // tp, m.hidden_size, dtype=mp.params_dtype))
        local = padded_vocab // tp
        start = parallel_state.get_tensor_model_parallel_rank() * local
        self.register_buffer(
            "vocab_padding", torch.arange(start, start + local) >= m.vocab_size, persistent=False
        )
        self.has_padding = bool(self.vocab_padding.any())  # decided here: a device .any() syncs the host

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.linear(x, weight=self.weight if weight is None else weight)[0]
        if self.has_padding:
            # in place: the matmul's output is not saved for backward, and a copy would be [tokens, vocab]
            logits.masked_fill_(self.vocab_padding.to(logits.device), torch.finfo(logits.dtype).min)
        return logits


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Next-token loss summed over the tokens ``loss_mask`` trains, divided by ``normalizer``.

    logits [s, b, v/tp]; labels, loss_mask [b, s]; returns a 0-dim fp32 tensor (nats per token).
    ``normalizer``: None divides by this micro-batch's own trained tokens (its mean); training passes
    the global batch's trained tokens / (micro-batches x data-parallel ranks), so that DeepSpeed's
    gradient-accumulation division and data-parallel mean give the mean over every trained token of
    the global batch (see ``Trainer.next_global_batch``); 1.0 gives the sum."""
    if compile_enabled() and parallel_state.get_tensor_model_parallel_world_size() == 1:
        losses = _cross_entropy(logits, labels.t().contiguous())  # one fused kernel, no all-reduces to trace
    else:
        losses = vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())  # [s, b]
    mask = loss_mask.t().to(losses.dtype)
    if normalizer is None:
        normalizer = mask.sum().clamp(min=1)
    return (losses * mask).sum() / normalizer


@compiled
def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss [s, b] from the full (tensor size 1) logits [s, b, v]."""
    flat = logits.float().flatten(0, 1)
    return F.cross_entropy(flat, labels.flatten(), reduction="none").view(labels.shape)
