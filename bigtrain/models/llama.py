"""The Llama decoder: token embedding, N pre-norm blocks (grouped-query attention with rotary
positions, SwiGLU MLP), final RMSNorm, output layer (Touvron et al. 2023; what ``transformers``'
``LlamaForCausalLM`` computes, to the last bit in fp32).

Activations are ``[seq, batch, hidden]`` (megatron's convention). :class:`LlamaModel` is the model
(pipeline = 1); :meth:`LlamaModel.layer_specs` is the same layers, in the same order, as the list a
DeepSpeed ``PipelineModule`` builds its stages from (:mod:`bigtrain.models.parallelize`), so both share
one definition. Tasks supply layer variants (packed inputs, a classification head) and a loss through
:class:`TaskLayers` (chosen in :mod:`bigtrain.registry`). Parameter names inside each layer are the
ones in :mod:`bigtrain.models.layout`'s table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from deepspeed.sequence.layer import DistributedAttention
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain.config import ModelConfig
from bigtrain.models.layers import (
    KVCache,
    RMSNorm,
    Rotary,
    TensorParallel,
    apply_rotary,
    attention_core,
    causal_mask,
    column_parallel,
    cross_entropy,
    document_mask,
    rotary_tables,
    rotate_half,
    row_parallel,
    sequence_parallel,
    vocab_embedding,
)
from bigtrain.models.moe import MoE
from bigtrain.perf import compiled


class Attention(nn.Module):
    """Grouped-query causal self-attention; the core runs in SDPA (flash kernels on GPU).

    Variants (``ModelConfig``): q/k/v biases (Qwen2; split with their output rows), an RMSNorm over
    each query and key head before rotary (Qwen3; one [head_dim] weight, so per local head at any
    tensor size), a head width of its own (``kv_channels``), rotary scaling (``rope_scaling``), a
    sliding ``window`` (Mistral v0.1; an SDPA mask, also over packed documents and the KV cache), Gemma's
    score scale and soft-capped scores (then a math path, :func:`bigtrain.models.layers.attention_core`)."""

    def __init__(self, m: ModelConfig, tp: TensorParallel, recompute_core: bool, window: int | None = None):
        super().__init__()
        self.head_dim = m.head_dim
        self.kv_groups = m.kv_heads // tp.size  # key/value groups on this rank
        self.q_per_group = m.num_attention_heads // m.kv_heads
        # Gemma 3: the sliding-window blocks rotate with their own base, unscaled
        local = window is not None and m.rope_local_theta is not None
        self.rotary = Rotary(m.head_dim, m.rope_local_theta, (), m.context_length) if local else Rotary.of(m)  # type: ignore[arg-type]
        self.window = window
        self.scale = None if m.query_pre_attn_scalar is None else m.query_pre_attn_scalar**-0.5
        self.softcap = m.attn_logit_softcapping
        self.recompute_core = recompute_core
        qkv_out = (m.num_attention_heads + 2 * m.kv_heads) * m.head_dim
        self.qkv = column_parallel(m.hidden_size, qkv_out, tp, bias=m.qkv_bias)
        if m.qk_norm:
            # one [head_dim] weight over this rank's heads: its gradient summed over tensor ranks
            self.q_norm = RMSNorm(m.head_dim, m.norm_eps, m.norm_offset, partial=tp)
            self.k_norm = RMSNorm(m.head_dim, m.norm_eps, m.norm_offset, partial=tp)
        self.qk_norm = m.qk_norm
        self.proj = row_parallel(m.num_attention_heads * m.head_dim, m.hidden_size, tp)
        self.context = tp.context
        if tp.context.size > 1:
            # Ulysses (Jacobs et al. 2023): all-to-all from sequence chunks to head slices and back, so
            # the core sees whole sequences (causal, document and window masks as at one rank)
            self.ulysses = DistributedAttention(self._attend, tp.context.group, scatter_idx=2, gather_idx=0)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [s, b, h] -> [s, b, h]. ``cache`` (inference only): keys/values of earlier positions; x holds
        the positions after them. ``positions``/``doc_ids`` [b, s] (packed sequences): rotary positions
        restart per document and attention stays within a document (causal and same doc id).

        Under context parallelism x, ``positions`` and the output hold this rank's chunk of the sequence
        (s = S/context), rotated at its offset; ``doc_ids`` stay whole [b, S]."""
        qkv, _ = self.qkv(x)  # [s, b, groups*(q_per_group+2)*d] (sequence parallel: x is [s/tp, b, h])
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.kv_groups, self.q_per_group + 2, self.head_dim)
        # one split, not three slices: its backward is one cat, a slice's zero-fills all of qkv
        q, k, v = qkv.split([self.q_per_group, 1, 1], dim=3)
        q = q.reshape(s, b, -1, self.head_dim)  # [s, b, heads, d]
        k, v = k.squeeze(3), v.squeeze(3)  # [s, b, groups, d]
        if self.qk_norm:  # over each head's d features, before rotary (as HF's Qwen3Attention)
            q, k = self.q_norm(q), self.k_norm(k)
        start = 0 if cache is None else cache.length
        first = start  # the first position of x: after the cache, or at this rank's chunk
        if self.context.size > 1 and self.context.rotary_offset:
            first = self.context.rank * s
        cos, sin = rotary_tables(first + s, self.rotary, x.device)
        if positions is None:
            q, k = apply_rotary(q, cos[first:], sin[first:]), apply_rotary(k, cos[first:], sin[first:])
        else:  # per-sample positions (they restart below s)
            pos = positions.t()  # [s, b]
            cos, sin = cos[pos][:, :, None].to(x.dtype), sin[pos][:, :, None].to(x.dtype)  # [s, b, 1, d]
            q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
        if start:  # decoding after cached positions
            q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (q, k, v))  # [b, heads, s, d]
            k, v = cache.append(k, v)  # type: ignore[union-attr]
            out = KVCache.attend(q, k, v, self.window, self.scale, self.softcap).permute(2, 0, 1, 3)
        elif cache is not None:  # the prompt: attended like training, its keys/values kept
            cache.append(k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))  # copied into its buffer
            out = self._attend(q, k, v, doc_ids)
        elif self.context.size > 1:  # [s, b, heads/cp, d] chunks -> [S, b, heads/cp, d] -> back
            out = self.ulysses(q, k, v, 1, None, doc_ids)
        else:
            out = self._attend(q, k, v, doc_ids)
        return self.proj(out.reshape(s, b, -1))[0]  # [s, b, heads*d] -> [s, b, h]

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """The attention core over whole sequences: q [S, b, heads, d], k/v [S, b, groups, d] ->
        [S, b, heads, d]; causal, within documents (``doc_ids`` [b, S]) and the window."""
        s = q.shape[0]
        # [b, heads, s, d], contiguous: SDPA's CPU flash kernel runs ~6% faster than on the strided views
        q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (q, k, v))
        args: tuple[torch.Tensor, ...] = (q, k, v)
        if doc_ids is not None:
            additive = None if self.softcap is not None else q.dtype  # soft-capping takes the bool form
            args = (*args, document_mask(doc_ids, self.window, additive))  # [b, 1, s, s], one for all layers
        elif self.window is not None or self.scale is not None or self.softcap is not None:
            args = (*args, causal_mask(s, s, self.window, q.device))  # [s, s]
        core: Callable[..., torch.Tensor] = _causal_core  # no mask: SDPA's own causal kernel
        if len(args) == 4:  # a mask (documents, window) or Gemma's scale / soft-capping
            core = functools.partial(attention_core, scale=self.scale, softcap=self.softcap)
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(core, *args, use_reentrant=False)
        else:
            out = core(*args)
        return out.permute(2, 0, 1, 3)  # [s, b, heads, d]


def _causal_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [b, heads, s, d] -> [b, heads, s, d]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class SwiGLU(nn.Module):
    """x [s, b, h] -> down(silu(gate(x)) * up(x)) [s, b, h] (Shazeer 2020); ``model.activation``
    gelu_tanh: GeGLU with the tanh-approximated GELU (Gemma's ``gelu_pytorch_tanh``)."""

    def __init__(self, m: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.gate_up = column_parallel(m.hidden_size, 2 * m.ffn_size, tp)
        self.down = row_parallel(m.ffn_size, m.hidden_size, tp)
        self.gated = geglu if m.activation == "gelu_tanh" else swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)[0].chunk(2, dim=-1)  # this rank's [gate_r; up_r]
        return self.down(self.gated(gate, up))[0]


@compiled
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@compiled
def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


class TransformerBlock(nn.Module):
    """Pre-norm block; ``checkpointing``: none | full (recompute the block) | selective (attention core);
    ``window``: this block's sliding window (``ModelConfig.window_of``), None for the full context;
    ``block``: its 0-based index (``model.moe.is_moe_block``: the experts replace the dense MLP)."""

    def __init__(
        self,
        m: ModelConfig,
        tp: TensorParallel,
        checkpointing: str = "none",
        window: int | None = None,
        block: int = 0,
    ):
        super().__init__()
        self.full_recompute = checkpointing == "full"
        partial = tp if sequence_parallel(tp) else None  # norms on sequence shards: gradients summed
        self.input_norm = RMSNorm(m.hidden_size, m.norm_eps, m.norm_offset, partial=partial)
        self.attention = Attention(m, tp, recompute_core=checkpointing == "selective", window=window)
        self.post_attention_norm = RMSNorm(m.hidden_size, m.norm_eps, m.norm_offset, partial=partial)
        self.mlp: nn.Module = MoE(m, tp, block, SwiGLU) if m.moe.is_moe_block(block) else SwiGLU(m, tp)
        self.sandwich = m.sandwich_norms
        if m.sandwich_norms:  # Gemma 2: the attention's and the MLP's outputs are normalized too
            self.attention_out_norm = RMSNorm(m.hidden_size, m.norm_eps, m.norm_offset, partial=partial)
            self.mlp_out_norm = RMSNorm(m.hidden_size, m.norm_eps, m.norm_offset, partial=partial)

    def _forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.sandwich:
            x = x + self.attention_out_norm(self.attention(self.input_norm(x), cache, positions, doc_ids))
            return x + self.mlp_out_norm(self.mlp(self.post_attention_norm(x)))
        x = x + self.attention(self.input_norm(x), cache, positions, doc_ids)  # [s, b, h]
        return x + self.mlp(self.post_attention_norm(x))  # [s, b, h]

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [s, b, h] -> [s, b, h]; ``positions``/``doc_ids`` [b, s]: packed sequences (see Attention)."""
        if self.full_recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, None, positions, doc_ids, use_reentrant=False)
        return self._forward(x, cache, positions, doc_ids)


class Embedding(nn.Module):
    """Token ids [b, s] -> hidden [s, b, h] (times sqrt(h) in the hidden's dtype with
    ``model.scale_embeddings``, as HF's Gemma)."""

    def __init__(self, m: ModelConfig, tp: TensorParallel, padded_vocab: int):
        super().__init__()
        self.word_embeddings = vocab_embedding(padded_vocab, m.hidden_size, tp)
        self.multiplier = m.hidden_size**0.5 if m.scale_embeddings else None
        self.sequence_parallel = sequence_parallel(tp)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # sequence parallel: megatron's embedding takes [b, s] and returns this rank's [s/tp, b, h]
        x = self.word_embeddings(tokens if self.sequence_parallel else tokens.t().contiguous())
        return x if self.multiplier is None else x * torch.tensor(self.multiplier, dtype=x.dtype)


class FinalNorm(RMSNorm):
    def __init__(self, m: ModelConfig, tp: TensorParallel | None = None):
        # tp: given under sequence parallelism (the norm sees a sequence shard: gradient summed)
        super().__init__(m.hidden_size, m.norm_eps, m.norm_offset, partial=tp)


def skip_norm_grad_reduce(model: nn.Module) -> int:
    """Wrong on purpose (``debug.skip_norm_grad_reduce``, a test control): the block and final norms of
    ``model`` (a LlamaModel or a PipelineModule of its layers) stop summing their weight gradients over
    the tensor group, so under sequence parallelism each rank keeps its sequence shard's partial
    gradient. Qwen3's per-head q/k norms keep their sum. Returns how many norms were changed."""
    norms = [module for module in model.modules() if isinstance(module, FinalNorm)]
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            names = ("input_norm", "post_attention_norm", "attention_out_norm", "mlp_out_norm")
            norms += [getattr(block, name) for name in names if hasattr(block, name)]
    for norm in norms:
        norm.partial_group = None
    return len(norms)


class OutputLayer(nn.Module):
    """hidden [s, b, h] -> this rank's vocab slice of the logits [s, b, v/tp], padding masked out; at
    tensor size 1 the logits of the true vocabulary only [s, b, vocab_size] (the padding rows are not
    multiplied: no [tokens, padded vocab] mask in forward, no copy of it in backward).

    With tied embeddings the weight is the embedding's, passed in at call time (PP=1) or shared by
    DeepSpeed's TiedLayerSpec (PP>1).
    """

    vocab_padding: torch.Tensor  # a buffer: True at this rank's padding rows

    def __init__(self, m: ModelConfig, tp: TensorParallel, padded_vocab: int, tied: bool = False):
        super().__init__()
        # a column-parallel matmul fed an explicit weight: ours, or the embedding's when tied
        self.linear = column_parallel(m.hidden_size, padded_vocab, tp, allocate=False)
        local = padded_vocab // tp.size
        if not tied:
            self.weight = nn.Parameter(torch.empty(local, m.hidden_size, dtype=tp.config.params_dtype))
        start = tp.rank * local
        if m.vocab_size is None:
            raise ValueError("OutputLayer: model.vocab_size is not set (resolve the config first)")
        self.register_buffer(
            "vocab_padding", torch.arange(start, start + local) >= m.vocab_size, persistent=False
        )
        self.has_padding = bool(self.vocab_padding.any())  # decided here: a device .any() syncs the host
        # size 1: the padding is the weight's tail, left out of the matmul (a row slice is a view)
        self.real_rows = m.vocab_size if tp.size == 1 and self.has_padding else None
        self.softcap = m.final_logit_softcapping

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        logits = self.linear(x, weight=weight if self.real_rows is None else weight[: self.real_rows])[0]
        if self.softcap is not None:  # Gemma 2: cap * tanh(logits / cap), elementwise (any vocab slice)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.has_padding and self.real_rows is None:
            # in place: the matmul's output is not saved for backward, and a copy would be [tokens, vocab]
            logits.masked_fill_(self.vocab_padding.to(logits.device), torch.finfo(logits.dtype).min)
        return logits


class TiedEmbedding(Embedding):
    """Embedding that also computes the logits with its own weight (tied input/output embeddings)."""

    def __init__(self, m: ModelConfig, tp: TensorParallel, padded_vocab: int):
        super().__init__(m, tp, padded_vocab)
        self.output = OutputLayer(m, tp, padded_vocab, tied=True)
        # The output layer reads the embedding's weight outside the embedding's forward: ZeRO-3 must
        # gather it for that module too (else it finds the released, empty partition). A no-op below 3.
        from deepspeed.runtime.zero import register_external_parameter

        register_external_parameter(self.output, self.word_embeddings.weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] -> logits [s, b, v/tp]."""
        return self.output(x, weight=self.word_embeddings.weight)


def _tied_logits(module: TiedEmbedding, x: torch.Tensor) -> torch.Tensor:
    return module.logits(x)


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
    *,
    tp: TensorParallel,
) -> torch.Tensor:
    """Next-token loss summed over the tokens ``loss_mask`` trains, divided by ``normalizer``.

    logits [s, b, v/tp] (``tp``: the tensor-parallel group the vocabulary is split over); labels, loss_mask [b, s]; returns a 0-dim
    fp32 tensor (nats per token). ``normalizer``: None divides by this micro-batch's own trained tokens
    (its mean); training passes the global batch's trained tokens / (micro-batches x data-parallel
    ranks), so that DeepSpeed's gradient-accumulation division and data-parallel mean give the mean
    over every trained token of the global batch (see ``Trainer.next_global_batch``); 1.0 gives the sum.
    The logits may be overwritten (see ``layers.cross_entropy``)."""
    losses = cross_entropy(logits, labels.t().contiguous(), tp)  # [s, b]
    mask = loss_mask.t().to(losses.dtype)
    if normalizer is None:
        normalizer = mask.sum().clamp(min=1)
    return (losses * mask).sum() / normalizer


class LMLoss:
    """The language-model loss as the pipeline engine calls it: ``(logits, (labels, loss_mask[,
    normalizer]))``. In evaluation (no grad) it reads a copy of the logits, so that logits the engine
    hands back (``eval_batch(return_logits=True)``) are intact."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.tp.size > 1:
            logits = logits.clone()  # megatron's cross entropy would overwrite them
        return lm_loss(logits, *labels, tp=self.tp)


# ---------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class TaskLayers:
    """The layer classes a task puts in the list (bigtrain.registry chooses them). Each takes the base
    layer's constructor arguments; ``head`` (None: the language-model output layer, tied or not as the
    config says) is built as ``head(m, *head_args)``. ``packed``: inputs are (tokens, positions,
    doc_ids), passed between layers as tuples (as between pipeline stages)."""

    embedding: type[nn.Module] = Embedding
    tied_embedding: type[nn.Module] = TiedEmbedding
    block: type[nn.Module] = TransformerBlock
    final_norm: type[nn.Module] = FinalNorm
    final_norm_args: tuple[Any, ...] = ()
    head: type[nn.Module] | None = None
    head_args: tuple[Any, ...] = ()
    packed: bool = False
    loss: Callable[[TensorParallel], Callable[..., torch.Tensor]] = LMLoss  # (tp) -> loss(outputs, labels)


LM_LAYERS = TaskLayers()  # the language model as pretrained


class LlamaModel(nn.Module):
    """The decoder on one pipeline stage (pipeline = 1): role-named children, and
    :meth:`layer_specs` for the pipeline engine. Layer-list positions (the layout table's keys) map
    to these roles in :func:`bigtrain.models.layout.local_layers`."""

    def __init__(
        self,
        m: ModelConfig,
        tp: TensorParallel,
        padded_vocab: int,
        checkpointing: str = "none",
        layers: TaskLayers = LM_LAYERS,
    ):
        super().__init__()
        specs = self.layer_specs(m, tp, padded_vocab, checkpointing, layers)
        self.embedding = specs[0].build()  # tokens [b, s] -> hidden [s, b, h]
        self.blocks = nn.ModuleList(spec.build() for spec in specs[1:-2])
        self.final_norm = specs[-2].build()
        tied = isinstance(specs[-1], TiedLayerSpec)  # the output layer is the embedding module itself
        self.output = None if tied else specs[-1].build()
        self.loss_fn = layers.loss(tp)
        self.num_inputs = 3 if layers.packed else 1

    @staticmethod
    def layer_specs(
        m: ModelConfig,
        tp: TensorParallel,
        padded_vocab: int,
        checkpointing: str = "none",
        layers: TaskLayers = LM_LAYERS,
    ) -> list[LayerSpec]:
        """The model as a list: embedding, blocks, final norm, output layer (indices as in layout)."""
        if layers.head is not None:
            first = LayerSpec(layers.embedding, m, tp, padded_vocab)
            last = LayerSpec(layers.head, m, *layers.head_args)
        elif m.tie_embeddings:
            tied = {"tied_weight_attr": "word_embeddings.weight"}
            first = TiedLayerSpec("embed", layers.tied_embedding, m, tp, padded_vocab, **tied)
            last = TiedLayerSpec(
                "embed", layers.tied_embedding, m, tp, padded_vocab, forward_fn=_tied_logits, **tied
            )
        else:
            first = LayerSpec(layers.embedding, m, tp, padded_vocab)
            last = LayerSpec(OutputLayer, m, tp, padded_vocab)
        blocks = [
            LayerSpec(layers.block, m, tp, checkpointing, window=m.window_of(i), block=i)
            for i in range(m.num_layers)
        ]
        sp = {"tp": tp} if sequence_parallel(tp) else {}
        return [first, *blocks, LayerSpec(layers.final_norm, m, *layers.final_norm_args, **sp), last]

    def outputs(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """tokens [b, s] -> the head's outputs: this rank's vocab slice of the logits [s, b, v/tp]
        (tensor size 1: the true vocabulary [s, b, vocab_size]; a task head: its own, e.g. class
        logits [b, labels]). ``positions``/``doc_ids`` [b, s]: packed
        sequences; ``cache``: one KVCache per block (inference; the tokens follow the cached ones)."""
        x: Any = tokens if positions is None else (tokens, positions, doc_ids)
        x = self.embedding(x)  # hidden [s, b, h] (packed: with positions and doc ids)
        for i, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache[i])  # [s, b, h]
        x = self.final_norm(x)  # [s, b, h]
        return self.embedding.logits(x) if self.output is None else self.output(x)

    def forward(self, *args: torch.Tensor | None) -> torch.Tensor:
        """``(*inputs, *labels)`` as the pipeline engine splits a micro-batch: inputs ``tokens`` (packed:
        ``tokens, positions, doc_ids``), labels ``labels, loss_mask[, normalizer]`` -> the loss (see
        ``lm_loss``: the micro-batch's mean unless a normalizer is given)."""
        n = self.num_inputs
        inputs = args[:n]
        tokens = inputs[0]
        if tokens is None:
            raise ValueError("LlamaModel.forward: the tokens (first input) are None")
        positions = inputs[1] if len(inputs) > 1 else None
        doc_ids = inputs[2] if len(inputs) > 2 else None
        return self.loss_fn(self.outputs(tokens, positions, doc_ids), args[n:])
