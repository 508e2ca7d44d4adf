"""Building blocks shared by bigtrain's model families: tensor-parallel linears, the vocabulary
embedding and cross entropy, RMSNorm, rotary tables (plain and scaled), attention masks and the KV cache.

A layer is told its tensor-parallel place by a :class:`TensorParallel` argument (rank, size, group,
megatron-core's config) instead of reading global state. At size > 1 the linears, the embedding and
the loss are megatron-core's tensor-parallel ones; at size 1 they are the plain torch operations those
reduce to (megatron-core's layers need an initialized process group even at size 1), with the same
parameter names and return convention, so a model can be built and run in a unit test without any
process group, and a one-rank layout pays for no communication bookkeeping.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.perf import compiled


def _plain_config() -> ModelParallelConfig:
    return ModelParallelConfig(
        params_dtype=torch.float32, use_cpu_initialization=True, perform_initialization=False
    )


@dataclass(frozen=True)
class ContextParallel:
    """Where a rank's chunk of each sequence sits (``parallel.context``): rank r of ``size`` holds
    positions [r*s/size, (r+1)*s/size) of every sample; attention spans ``group`` (DeepSpeed-Ulysses).
    ``rotary_offset`` False is the wrong-on-purpose control (``debug.skip_rotary_offset``)."""

    rank: int = 0
    size: int = 1
    group: torch.distributed.ProcessGroup | None = None
    rotary_offset: bool = True

    def __post_init__(self) -> None:
        if self.size > 1 and self.group is None:
            raise ValueError(f"context-parallel size {self.size} needs its process group")


@dataclass(frozen=True)
class ExpertParallel:
    """Where a rank's experts sit (``parallel.expert``): rank r of ``size`` holds experts
    [r*E/size, (r+1)*E/size) of every MoE block. ``groups``: megatron-core's process groups for its MoE
    layer (``megatron.core.process_groups_config.ProcessGroupCollection``), None in a process without
    torch.distributed (then size 1)."""

    rank: int = 0
    size: int = 1
    groups: Any = None

    def __post_init__(self) -> None:
        if self.size > 1 and self.groups is None:
            raise ValueError(f"expert-parallel size {self.size} needs its process groups")


@dataclass(frozen=True)
class TensorParallel:
    """Where a layer sits in the tensor-parallel group (see :func:`bigtrain.models.parallelize.tensor_parallel`).

    ``group``: the tensor-parallel process group (None only in a process without one, at size 1);
    ``config``: megatron-core's ``ModelParallelConfig`` for its layers (used when ``size > 1``);
    ``context``: the context-parallel group the layer's attention spans (size 1: none), and ``expert``:
    where the MoE blocks' experts sit (size 1: all here), carried here so that every layer constructor
    keeps one "model-parallel place" argument."""

    rank: int = 0
    size: int = 1
    group: torch.distributed.ProcessGroup | None = None
    config: ModelParallelConfig = field(default_factory=_plain_config)
    context: ContextParallel = field(default_factory=ContextParallel)
    expert: ExpertParallel = field(default_factory=ExpertParallel)

    def __post_init__(self) -> None:
        if self.size > 1 and self.group is None:
            raise ValueError(f"tensor-parallel size {self.size} needs its process group")


def _no_init(weight: torch.Tensor) -> None:
    """Weights are filled by bigtrain.models.layout (layout-independent init), not by megatron."""


class Linear(nn.Module):
    """A linear at tensor size 1, returning ``(output, None)`` like megatron-core's parallel linears (the
    bias, if any, added). ``weight`` [out, in], ``bias`` [out]; with ``allocate=False`` the weight is
    passed at call time."""

    def __init__(self, in_size: int, out_size: int, allocate: bool = True, bias: bool = False):
        super().__init__()
        if allocate:
            self.weight = nn.Parameter(torch.empty(out_size, in_size))
        self.bias = nn.Parameter(torch.empty(out_size)) if bias else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight if weight is None else weight, self.bias), None


def column_parallel(
    in_size: int, out_size: int, tp: TensorParallel, allocate: bool = True, bias: bool = False
) -> nn.Module:
    """Linear with its output features (and bias) split over tensor ranks (output stays split)."""
    if tp.size == 1:
        return Linear(in_size, out_size, allocate, bias)
    return ColumnParallelLinear(
        in_size,
        out_size,
        config=tp.config,
        init_method=_no_init,
        bias=bias,
        skip_bias_add=False,
        gather_output=False,
        skip_weight_param_allocation=not allocate,
        tp_group=tp.group,
    )


def row_parallel(in_size: int, out_size: int, tp: TensorParallel, bias: bool = False) -> nn.Module:
    """Linear with its input features split over tensor ranks (output all-reduced); the ``bias`` [out]
    (bert) is whole on every rank and added after the all-reduce."""
    if tp.size == 1:
        return Linear(in_size, out_size, bias=bias)
    return RowParallelLinear(
        in_size,
        out_size,
        config=tp.config,
        init_method=_no_init,
        bias=bias,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=tp.group,
    )


class _Embedding(nn.Module):
    """Token ids -> rows of ``weight`` [vocab, h] at tensor size 1 (what VocabParallelEmbedding does there)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def vocab_embedding(padded_vocab: int, hidden: int, tp: TensorParallel) -> nn.Module:
    """Embedding whose rows (the vocabulary) are split over tensor ranks; output is the full hidden."""
    if tp.size == 1:
        return _Embedding(padded_vocab, hidden)
    return VocabParallelEmbedding(
        padded_vocab,
        hidden,
        init_method=_no_init,
        config=tp.config,
        tp_group=tp.group,
        # sequence parallel: reduce-scattered over the sequence (ids [b, s] in, [s/tp, b, h] out)
        reduce_scatter_embeddings=sequence_parallel(tp),
    )


def sequence_parallel(tp: TensorParallel) -> bool:
    """Megatron sequence parallelism: activations outside the tensor-parallel regions hold seq / tp
    positions per rank (``parallel.sequence_parallel``)."""
    return tp.size > 1 and bool(tp.config.sequence_parallel)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Per-token loss [s, b] (fp32) of this rank's vocab slice of the logits [s, b, v/tp].

    megatron-core's vocab-parallel cross entropy at tensor size > 1; torch's fused one at size 1, where
    megatron's would still run its three all-reduces (over a group of one) and its unfused softmax
    (~1.3x torch's fwd+bwd time on CPU at [256, 4, 8000]; the two differ in the last bits). megatron's
    works in place on ``logits.float()`` (the very tensor in fp32): callers that need the logits
    afterwards pass a copy."""
    if tp.size == 1:
        return _cross_entropy(logits, labels)
    return vocab_parallel_cross_entropy(logits.float(), labels)


@compiled
def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss [s, b] from the full (tensor size 1) logits [s, b, v]."""
    flat = logits.float().flatten(0, 1)
    return F.cross_entropy(flat, labels.flatten(), reduction="none").view(labels.shape)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 like HF's LlamaRMSNorm (so exports match to the last bit); with
    ``offset`` Gemma's: scaled by ``1 + weight`` and cast back only at the end (HF's Gemma2RMSNorm).

    ``partial``: the tensor-parallel place of a norm whose (replicated) weight each rank applies to its
    own part of the activations only (Qwen3's per-head q/k norms: this rank's heads), so each rank's
    weight gradient is a partial sum: it is summed over the tensor-parallel group in backward
    (megatron-core's ``copy_to_tensor_model_parallel_region``; Megatron-LM all-reduces q/k layernorm
    gradients in ``finalize_model_grads`` instead, a step DeepSpeed does not have)."""

    def __init__(self, size: int, eps: float, offset: bool = False, partial: TensorParallel | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if offset else torch.ones(size))
        self.eps, self.offset = eps, offset
        self.partial_group = partial.group if partial is not None and partial.size > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.partial_group is not None:  # identity forward, all-reduce of the gradient in backward
            weight = copy_to_tensor_model_parallel_region(weight, group=self.partial_group)
        if self.offset:
            return rms_norm_offset(x, weight, self.eps)
        return rms_norm(x, weight, self.eps)


@compiled
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@compiled
def rms_norm_offset(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).type_as(x)


class LayerNorm(nn.Module):
    """LayerNorm with ``weight`` and ``bias`` [size] (Ba et al. 2016; the bert family's, as HF's
    ``nn.LayerNorm``); x [..., size] -> [..., size]."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class Rotary:
    """What the rotary tables depend on (hashable: the tables are cached by it). ``scaling``: the
    ``model.rope_scaling`` fields as (name, value) pairs, () for plain rotary; ``context``:
    the model's declared context (``ModelConfig.context_length``), the default original context of
    llama3/yarn."""

    head_dim: int
    theta: float
    scaling: tuple[tuple[str, object], ...] = ()
    context: int = 0

    @classmethod
    def of(cls, m: ModelConfig) -> Rotary:
        r = m.rope_scaling
        scaling = () if r.type == "none" else tuple(dataclasses.asdict(r).items())
        return cls(m.head_dim, m.rope_theta, scaling, m.context_length)


def rope_frequencies(rot: Rotary, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (fp32) and the factor cos/sin are multiplied by.

    Plain: ``theta^(-2i/d)`` (Su et al. 2021). ``linear``: divided by ``factor`` (position
    interpolation, Chen et al. 2023). ``llama3`` (Meta's Llama 3.1 release): wavelengths longer than
    ``original/low_freq_factor`` divided by ``factor``, shorter than ``original/high_freq_factor`` kept,
    a linear blend in between. ``yarn`` (Peng et al. 2023, "NTK-by-parts"): dimensions that turn fewer
    than ``beta_slow`` times over the original context are interpolated, more than ``beta_fast`` times
    extrapolated, a ramp between; cos/sin scaled by ``0.1 ln(factor) + 1`` (or the given factor, or
    DeepSeek's mscale ratio). HF's ``rope_init_fn``s compute the same (tests/models/test_variants.py)."""
    d = rot.head_dim
    base = rot.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
    inv_freq = 1.0 / base
    s = dict(rot.scaling)
    kind = s.get("type", "none")
    if kind == "none":
        return inv_freq, 1.0
    factor = float(s["factor"])  # type: ignore[arg-type]
    original = float(s["original_max_position_embeddings"] or rot.context)  # type: ignore[arg-type]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])  # type: ignore[arg-type]
        wavelength = 2 * math.pi / inv_freq
        smooth = (original / wavelength - low) / (high - low)  # 0 at the long end of the band, 1 at the short
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, blended)
        return torch.where(wavelength < original / high, inv_freq, scaled), 1.0
    if kind == "yarn":
        fast, slow = float(s["beta_fast"] or 32), float(s["beta_slow"] or 1)  # type: ignore[arg-type]

        def dim_turning(rotations: float) -> float:
            """The (fractional) dimension whose frequency turns ``rotations`` times over the original context."""
            return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rot.theta))

        lo, hi = dim_turning(fast), dim_turning(slow)
        if s["truncate"] is not False:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        ramp = (
            (torch.arange(d // 2, dtype=torch.float32, device=device) - lo) / (hi - lo if hi != lo else 0.001)
        ).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)  # ramp 0: extrapolate, 1: interpolate
        attention = s["attention_factor"]
        if attention is None:

            def mscale(m: float) -> float:
                return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

            ms, ms_all = s["mscale"], s["mscale_all_dim"]
            attention = mscale(ms) / mscale(ms_all) if ms and ms_all else mscale(1.0)  # type: ignore[arg-type]
        return inv_freq, float(attention)  # type: ignore[arg-type]
    raise ValueError(f"model.rope_scaling.type {kind!r}: expected none|linear|llama3|yarn")


def rotary_tables(seq_len: int, rot: Rotary, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos/sin [seq_len, head_dim] for rotate-half rotary embeddings (RoFormer, Su et al. 2021; the
    HF Llama / megatron non-interleaved convention), scaled as ``rot`` says (:func:`rope_frequencies`).
    The one set of tables of training, KV-cached generation and (through the config) the export.
    Cached: every block of every step asks for the same tables (8 small kernels each otherwise)."""
    return _rotary_tables(seq_len, rot, torch.device(device), torch.is_inference_mode_enabled())


@functools.lru_cache(maxsize=16)
def _rotary_tables(
    seq_len: int, rot: Rotary, device: torch.device, inference: bool
) -> tuple[torch.Tensor, ...]:
    # ``inference`` keys the cache: tensors made under inference_mode cannot be saved for backward
    inv_freq, attention_factor = rope_frequencies(rot, device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, d]
    if attention_factor == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * attention_factor, emb.sin() * attention_factor


@compiled
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [s, b, heads, d]; cos/sin: [s, d]."""
    return rotate_half(x, cos[:, None, None, :].to(x.dtype), sin[:, None, None, :].to(x.dtype))


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [s, b, heads, d]; cos/sin broadcastable to it (e.g. [s, b, 1, d]: per-sample positions)."""
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
        if self.k is None or self.v is None:
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
    def attend(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int | None = None,
        scale: float | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """q [b, heads, s, d] are the last s positions of k/v [b, groups, t, d]; ``window``: sliding;
        ``scale``/``softcap``: see :func:`attention_core`. A single plain position attends to
        everything, so it needs no mask."""
        s, t = q.shape[2], k.shape[2]
        plain = s == 1 and window is None and scale is None and softcap is None
        mask = None if plain else causal_mask(s, t, window, q.device)
        return attention_core(q, k, v, mask, scale, softcap)


def attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """SDPA over a bool ``mask`` (True where attended; None: everything) with an optional score
    ``scale`` (Gemma's ``query_pre_attn_scalar``); with ``softcap`` the math path of
    :func:`softcapped_attention` (which needs the mask). q [b, heads, s, d], k/v [b, groups, t, d]."""
    if softcap is not None:
        if mask is None:
            raise ValueError("attention_core: soft-capped attention needs its mask")
        return softcapped_attention(q, k, v, mask, scale, softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def causal_mask(s: int, t: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[s, t] bool, True where attended: the s queries are the last of t positions; query p sees key j
    when ``j <= p`` and, with a sliding ``window``, ``p - j < window`` (itself and the window-1 keys
    before it: HF's ``sliding_window_overlay``, Mistral's definition)."""
    q = torch.arange(t - s, t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    mask = k <= q
    return mask if window is None else mask & (q - k < window)


# (id(doc_ids), window, dtype) -> mask; an entry lives as long as its doc_ids tensor (see document_mask)
_DOCUMENT_MASKS: dict[tuple[int, int | None, torch.dtype | None], torch.Tensor] = {}


def document_mask(
    doc_ids: torch.Tensor, window: int | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """[b, 1, s, s]: causal (and within ``window``) and in the same document; ``doc_ids`` [b, s]. Bool,
    True where attended; with ``dtype`` the additive form SDPA uses (0 attended, -inf not), which SDPA
    would otherwise make from a bool mask in every layer and save for backward (4 GiB per sample at
    32k in fp32). Built once per ``doc_ids`` tensor, window and dtype and shared by every layer
    attending with them, so autograd saves one mask for all layers; dropped when ``doc_ids`` is freed."""
    key = (id(doc_ids), window, dtype)
    mask = _DOCUMENT_MASKS.get(key)
    if mask is None:
        s = doc_ids.shape[1]
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        mask = (causal_mask(s, s, window, doc_ids.device) & same_doc)[:, None]
        if dtype is not None:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        _DOCUMENT_MASKS[key] = mask
        weakref.finalize(doc_ids, _DOCUMENT_MASKS.pop, key, None)
    return mask


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None, cap: float
) -> torch.Tensor:
    """Attention with soft-capped scores (Gemma 2): ``cap * tanh(q.k * scale / cap)``, then the mask
    (bool, True where attended, broadcastable to [b, heads, s, t]) and an fp32 softmax. q [b, heads, s,
    d], k/v [b, groups, t, d] (query heads grouped per key/value group) -> [b, heads, s, d]. A math
    path: SDPA's kernels have no soft-capping."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
