"""The BERT encoder: word + learned position + token-type embeddings with LayerNorm, N post-LayerNorm
blocks (bidirectional multi-head attention and a GELU MLP, with biases), the pooler over [CLS], and the
pretraining heads: masked-language-model (transform, LayerNorm, decoder tied to the word embeddings,
bias) and next-sentence prediction (Devlin et al. 2019; what ``transformers``' ``BertForPreTraining``
computes).

Activations are ``[seq, batch, hidden]`` (megatron's convention). Like the decoder
(:mod:`bigtrain.models.llama`), :class:`BertModel` is the model at pipeline = 1 and
:meth:`BertModel.layer_specs` the same layers as the list a DeepSpeed ``PipelineModule`` builds its stages
from. The list (indices as in :mod:`bigtrain.models.layout`): embedding, blocks, pooler (in the final-norm
slot), head. Between layers travel tuples of tensors: ``(hidden, attention_mask)`` up to the pooler,
``(hidden, pooled)`` after it, so a task's head sees both the tokens' states (MLM, token classification)
and the pooled [CLS] state (NSP, sequence classification).

Tied decoder at pipeline > 1: the first stage's tied module is the embedding and the last stage's is the
head, which then owns a copy of the word embedding (DeepSpeed's ``TiedLayerSpec`` builds the module of
the first spec it meets on each stage, and keeps the attribute named ``tied_weight_attr`` in sync).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain.config import ModelConfig
from bigtrain.models.layers import (
    LayerNorm,
    Linear,
    TensorParallel,
    column_parallel,
    row_parallel,
    vocab_embedding,
)
from bigtrain.models.llama import OutputLayer, TaskLayers, lm_loss

TIED = "word_embeddings.weight"  # the attribute DeepSpeed keeps in sync between the tied stages


class BertEmbedding(nn.Module):
    """(tokens, token_types, attention_mask) [b, s] each -> (hidden [s, b, h], attention_mask [b, s]):
    word + token-type + position embeddings (positions 0..s-1), then LayerNorm (HF's ``BertEmbeddings``)."""

    layout_kind = "embed"

    def __init__(self, m: ModelConfig, tp: TensorParallel, padded_vocab: int):
        super().__init__()
        self.word_embeddings = vocab_embedding(padded_vocab, m.hidden_size, tp)
        # replicated on every tensor rank: small, and read whole by every token
        self.position_embeddings = nn.Embedding(m.context_length, m.hidden_size)
        self.token_type_embeddings = nn.Embedding(m.type_vocab_size, m.hidden_size)
        self.norm = LayerNorm(m.hidden_size, m.norm_eps)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, token_types, attention_mask = inputs
        s = tokens.shape[1]
        x = self.word_embeddings(tokens.t().contiguous())  # [s, b, h]
        x = x + self.token_type_embeddings(token_types.t())  # HF's order: (words + types) + positions
        x = x + self.position_embeddings.weight[:s, None]
        return self.norm(x), attention_mask


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over the real tokens (SDPA with the padding mask); q/k/v one
    column-parallel linear with bias, rows grouped per head ``[q_h; k_h; v_h]`` (the layout's qkv with
    one query per group), the output row-parallel with bias."""

    def __init__(self, m: ModelConfig, tp: TensorParallel, recompute_core: bool):
        super().__init__()
        self.head_dim = m.head_dim
        self.qkv = column_parallel(m.hidden_size, 3 * m.hidden_size, tp, bias=True)
        self.proj = row_parallel(m.hidden_size, m.hidden_size, tp, bias=True)
        self.recompute_core = recompute_core

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """x [s, b, h], attention_mask [b, s] (1: a real token) -> [s, b, h]."""
        s, b, _ = x.shape
        qkv = self.qkv(x)[0].view(s, b, -1, 3, self.head_dim)  # [s, b, heads/tp, 3, d]
        q, k, v = (t.squeeze(3).permute(1, 2, 0, 3).contiguous() for t in qkv.split(1, dim=3))  # [b, n, s, d]
        mask = attention_mask.bool()[:, None, None, :]  # [b, 1, 1, s]: every query sees the real keys
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(_attention_core, q, k, v, mask, use_reentrant=False)
        else:
            out = _attention_core(q, k, v, mask)
        out = out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, heads/tp * d]
        return self.proj(out)[0]


def _attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, n, s, d]


class MLP(nn.Module):
    """x [s, b, h] -> fc2(gelu(fc1(x))) [s, b, h]: fc1 column-parallel, fc2 row-parallel, both with bias."""

    def __init__(self, m: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.fc1 = column_parallel(m.hidden_size, m.ffn_size, tp, bias=True)
        self.fc2 = row_parallel(m.ffn_size, m.hidden_size, tp, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)[0]))[0]


class BertBlock(nn.Module):
    """Post-LayerNorm block: x = norm(x + attention(x)); x = norm(x + mlp(x)) (HF's ``BertLayer``).
    ``checkpointing``: none | full (recompute the block) | selective (the attention core)."""

    def __init__(self, m: ModelConfig, tp: TensorParallel, checkpointing: str = "none"):
        super().__init__()
        self.full_recompute = checkpointing == "full"
        self.attention = SelfAttention(m, tp, recompute_core=checkpointing == "selective")
        self.attention_norm = LayerNorm(m.hidden_size, m.norm_eps)
        self.mlp = MLP(m, tp)
        self.mlp_norm = LayerNorm(m.hidden_size, m.norm_eps)

    def _forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, attention_mask))  # [s, b, h]
        return self.mlp_norm(x + self.mlp(x))  # [s, b, h]

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, attention_mask = inputs
        if self.full_recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, attention_mask, use_reentrant=False), attention_mask
        return self._forward(x, attention_mask), attention_mask


class BertPooler(nn.Module):
    """(hidden [s, b, h], attention_mask) -> (hidden, pooled [b, h] = tanh(dense(hidden of [CLS])))."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.dense = Linear(m.hidden_size, m.hidden_size, bias=True)  # replicated on every tensor rank

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = inputs
        return x, torch.tanh(self.dense(x[0])[0])


class MLMTransform(nn.Module):
    """x [s, b, h] -> norm(gelu(dense(x))) [s, b, h] (HF's ``BertPredictionHeadTransform``; replicated)."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.dense = Linear(m.hidden_size, m.hidden_size, bias=True)
        self.norm = LayerNorm(m.hidden_size, m.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)[0]))


class BertPretrainingHead(nn.Module):
    """(hidden [s, b, h], pooled [b, h]) -> (MLM logits [s, b, v/tp] (tensor size 1: [s, b, vocab]),
    NSP logits [b, 2]). MLM: dense + GELU + LayerNorm, then the word embeddings as the decoder, plus a
    bias over the vocabulary (split like it); NSP: a linear on the pooled state (HF's
    ``BertPreTrainingHeads``). ``own_embedding``: hold the tied word embedding (the last pipeline stage);
    otherwise the decoder weight is passed to :meth:`forward`."""

    layout_kind = "head"
    tied = True  # the decoder is the word embedding (a TiedLayerSpec at pipeline > 1)

    def __init__(self, m: ModelConfig, tp: TensorParallel, padded_vocab: int, own_embedding: bool = True):
        super().__init__()
        h = m.hidden_size
        self.transform = MLMTransform(m)
        self.decoder = OutputLayer(m, tp, padded_vocab, tied=True)
        self.bias = nn.Parameter(torch.zeros(padded_vocab // tp.size))
        self.nsp = Linear(h, 2, bias=True)
        if own_embedding:
            self.word_embeddings = vocab_embedding(padded_vocab, h, tp)

    def forward(
        self, inputs: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, pooled = inputs
        decoder_weight: Any = self.word_embeddings.weight if weight is None else weight
        t = self.transform(x)  # [s, b, h]
        logits = self.decoder(t, weight=decoder_weight)  # [s, b, v/tp], padding at finfo.min
        rows = logits.shape[-1]  # tensor size 1: the true vocabulary only
        logits = logits + self.bias[:rows]
        return logits, self.nsp(pooled)[0]


class BertPretrainingLoss:
    """MLM + NSP loss as the pipeline engine calls it: ``((mlm_logits, nsp_logits), (labels, loss_mask,
    nsp_labels[, normalizer]))``. MLM: the masked tokens' loss sum over ``normalizer`` (see
    :func:`bigtrain.models.llama.lm_loss`: the global batch's masked-token mean in training); NSP: the
    micro-batch's mean over its samples, which DeepSpeed's accumulation and data-parallel means make the
    global batch's (equal micro-batches). ``nsp=False`` (``data.masking.sentence_pair: none``): MLM only."""

    def __init__(self, tp: TensorParallel, nsp: bool = True):
        self.tp, self.nsp = tp, nsp

    def __call__(
        self, outputs: tuple[torch.Tensor, torch.Tensor], labels: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        mlm_logits, nsp_logits = outputs
        tokens, loss_mask, nsp_labels, *normalizer = labels
        if not torch.is_grad_enabled() and self.tp.size > 1:
            mlm_logits = mlm_logits.clone()  # megatron's cross entropy would overwrite them
        loss = lm_loss(mlm_logits, tokens, loss_mask, *normalizer, tp=self.tp)
        if self.nsp:
            loss = loss + F.cross_entropy(nsp_logits.float(), nsp_labels.view(-1))
        return loss


PRETRAINING_LAYERS = TaskLayers(
    embedding=BertEmbedding,
    tied_embedding=BertEmbedding,
    block=BertBlock,
    final_norm=BertPooler,
    head=BertPretrainingHead,
    loss=BertPretrainingLoss,
)


class BertModel(nn.Module):
    """The encoder on one pipeline stage (pipeline = 1): role-named children (embedding, blocks, pooler
    in the ``final_norm`` role, head in the ``output`` role), and :meth:`layer_specs` for the pipeline
    engine. ``layers``: what a task swaps in (its head and loss; see :mod:`bigtrain.registry`)."""

    num_inputs = 3  # tokens, token_types, attention_mask

    def __init__(
        self,
        m: ModelConfig,
        tp: TensorParallel,
        padded_vocab: int,
        checkpointing: str = "none",
        layers: TaskLayers = PRETRAINING_LAYERS,
    ):
        super().__init__()
        specs = self.layer_specs(m, tp, padded_vocab, checkpointing, layers)
        self.embedding = specs[0].build()
        self.blocks = nn.ModuleList(spec.build() for spec in specs[1:-2])
        self.final_norm = specs[-2].build()  # the pooler
        self.tied = getattr(layers.head, "tied", False)
        if self.tied:  # the head reads the embedding's weight at call time
            from deepspeed.runtime.zero import register_external_parameter

            self.output = layers.head(m, tp, padded_vocab, own_embedding=False)  # type: ignore[misc]
            # ZeRO-3 gathers the weight for the head's forward too (a no-op below stage 3)
            register_external_parameter(self.output, self.embedding.word_embeddings.weight)
        else:
            self.output = specs[-1].build()
        self.loss_fn = layers.loss(tp)

    @staticmethod
    def layer_specs(
        m: ModelConfig,
        tp: TensorParallel,
        padded_vocab: int,
        checkpointing: str = "none",
        layers: TaskLayers = PRETRAINING_LAYERS,
    ) -> list[LayerSpec]:
        """The model as a list: embedding, blocks, pooler, head (indices as in the layout table)."""
        head = layers.head
        if head is None:
            raise ValueError("the bert family needs a head (TaskLayers.head)")
        if getattr(head, "tied", False):
            first: LayerSpec = TiedLayerSpec(
                "embed", layers.embedding, m, tp, padded_vocab, tied_weight_attr=TIED
            )
            last: LayerSpec = TiedLayerSpec("embed", head, m, tp, padded_vocab, True, tied_weight_attr=TIED)
        else:
            first = LayerSpec(layers.embedding, m, tp, padded_vocab)
            last = LayerSpec(head, m, *layers.head_args)
        blocks = [LayerSpec(layers.block, m, tp, checkpointing) for _ in range(m.num_layers)]
        return [first, *blocks, LayerSpec(layers.final_norm, m, *layers.final_norm_args), last]

    def outputs(self, tokens: torch.Tensor, token_types: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """tokens, token_types, attention_mask [b, s] -> the head's outputs (pretraining: MLM logits
        [s, b, v/tp] and NSP logits [b, 2]; a task head: its own)."""
        x: Any = self.embedding((tokens, token_types, attention_mask))  # (hidden [s, b, h], mask)
        for block in self.blocks:
            x = block(x)  # (hidden [s, b, h], mask)
        x = self.final_norm(x)  # (hidden [s, b, h], pooled [b, h])
        if self.tied:
            return self.output(x, weight=self.embedding.word_embeddings.weight)
        return self.output(x)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        """``(tokens, token_types, attention_mask, *labels)`` as the pipeline engine splits a micro-batch
        -> the loss (see the task's loss; pretraining: :class:`BertPretrainingLoss`)."""
        n = self.num_inputs
        return self.loss_fn(self.outputs(*args[:n]), args[n:])
