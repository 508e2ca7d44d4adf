"""Fine-tuning's layer variants on the base model: pretraining's layers fed packed sequences and a
classification head on the last non-pad token (the decoder), or the encoder's pooled-state and per-token
classifiers (bert), with their losses and evaluation statistics. They reach
the model through :class:`bigtrain.models.llama.TaskLayers` (chosen in :mod:`bigtrain.registry`);
LoRA is a transform applied after the build (:mod:`bigtrain.finetune.lora`).

Layers pass ``(hidden, positions, doc_ids)`` tuples (also between pipeline stages: DeepSpeed sends
integer tensors along and gives them no gradient); given a plain tensor they behave like pretraining's
layers, so ``bigtrain.generation`` runs a fine-tuned SFT (LoRA) checkpoint unchanged (the
classification head needs the document ids: it pools the last token of each).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.config import Config, ModelConfig
from bigtrain.models import bert, layout
from bigtrain.models.layers import KVCache, Linear, TensorParallel
from bigtrain.models.llama import (
    Embedding,
    FinalNorm,
    LMLoss,
    TaskLayers,
    TiedEmbedding,
    TransformerBlock,
    lm_loss,
)

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden or tokens, positions, doc_ids


class _PackedInput:
    """Embedding forward that passes positions and document ids along (plain tokens: as pretraining)."""

    def forward(self, inputs: torch.Tensor | Packed):
        if torch.is_tensor(inputs):
            return super().forward(inputs)  # type: ignore[misc]
        tokens, positions, doc_ids = inputs
        return super().forward(tokens), positions, doc_ids  # type: ignore[misc]


class PackedEmbedding(_PackedInput, Embedding):
    pass


class PackedTiedEmbedding(_PackedInput, TiedEmbedding):
    pass


class PackedBlock(TransformerBlock):
    # ignore: takes and returns (hidden, positions, doc_ids) tuples where TransformerBlock has tensors
    def forward(  # type: ignore[override]
        self, inputs: torch.Tensor | Packed, cache: KVCache | None = None
    ) -> torch.Tensor | Packed:
        if torch.is_tensor(inputs):
            return super().forward(inputs, cache)
        x, positions, doc_ids = inputs
        return super().forward(x, None, positions, doc_ids), positions, doc_ids


class PackedFinalNorm(FinalNorm):
    """Drops positions; keeps document ids for the classification head (which pools by them)."""

    def __init__(self, m: ModelConfig, keep_doc_ids: bool = False, tp: TensorParallel | None = None):
        super().__init__(m, tp)  # tp: under sequence parallelism (see FinalNorm)
        self.keep_doc_ids = keep_doc_ids

    def forward(self, inputs: torch.Tensor | Packed):
        if torch.is_tensor(inputs):
            return super().forward(inputs)
        x, _, doc_ids = inputs
        x = super().forward(x)
        return (x, doc_ids) if self.keep_doc_ids else x


class ClassificationHead(nn.Module):
    """``score`` of LlamaForSequenceClassification: logits of the last non-pad token (doc id >= 0).
    Replicated over tensor ranks (its input is the all-reduced hidden state, so gradients agree)."""

    def __init__(self, m: ModelConfig, num_labels: int):
        super().__init__()
        self.score = nn.Linear(m.hidden_size, num_labels, bias=False)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, doc_ids = inputs  # [s, b, h], [b, s]
        s, b, _ = x.shape
        last = (torch.arange(s, device=x.device) * (doc_ids >= 0)).argmax(-1)  # [b], as HF pools
        return self.score(x[last, torch.arange(b, device=x.device)])  # [b, labels]


def classify_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Cross-entropy summed over examples by weight (padding examples of a last batch weigh 0), divided
    by ``normalizer``. logits [b, labels]; labels, weights [b]; returns a 0-dim fp32 tensor. None: this
    micro-batch's own weight (its mean); training passes the global batch's (as ``lm_loss``)."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    if normalizer is None:
        normalizer = weights.sum().clamp(min=1)
    return (losses * weights).sum() / normalizer


class ClassifyLoss:
    """``classify_loss`` as the pipeline engine calls a loss: ``(logits, (labels, weights[, normalizer]))``."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp

    def __call__(self, outputs: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return classify_loss(outputs, *labels)


class BertSequenceHead(nn.Module):
    """``classifier`` of BertForSequenceClassification: (hidden [s, b, h], pooled [b, h]) -> logits
    [b, labels] of the pooled [CLS] state (dropout is off, as bigtrain trains without it). Replicated over
    tensor ranks (its input is whole on every rank, so gradients agree)."""

    def __init__(self, m: ModelConfig, num_labels: int):
        super().__init__()
        self.classifier = Linear(m.hidden_size, num_labels, bias=True)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        _, pooled = inputs
        return self.classifier(pooled)[0]


class BertTokenHead(nn.Module):
    """``classifier`` of BertForTokenClassification: (hidden [s, b, h], pooled) -> logits [b, s, labels]
    of every token (batch first, as the labels). Replicated over tensor ranks."""

    def __init__(self, m: ModelConfig, num_labels: int):
        super().__init__()
        self.classifier = Linear(m.hidden_size, num_labels, bias=True)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, _ = inputs
        return self.classifier(x.transpose(0, 1))[0]


def token_classify_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Cross-entropy summed over the trained tokens (``loss_mask`` 1: the first piece of a word) divided by
    ``normalizer``. logits [b, s, labels]; labels, loss_mask [b, s]; returns a 0-dim fp32 tensor. None:
    this micro-batch's trained tokens (its mean); training passes the global batch's (as ``lm_loss``)."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    mask = loss_mask.flatten().float()
    if normalizer is None:
        normalizer = mask.sum().clamp(min=1)
    return (losses * mask).sum() / normalizer


class TokenClassifyLoss:
    """``token_classify_loss`` as the pipeline engine calls a loss: ``(logits, (labels, loss_mask[,
    normalizer]))``."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp

    def __call__(self, outputs: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return token_classify_loss(outputs, *labels)


def bert_task_layers(cfg: Config) -> TaskLayers:
    """The bert family's fine-tuning layers: pretraining's embedding, blocks and pooler, the sequence
    (classify) or token (token_classify) classifier in place of the MLM/NSP heads."""
    token = cfg.finetune.task == "token_classify"
    if cfg.finetune.task not in ("classify", "token_classify"):
        raise ValueError(f"model.family bert fine-tunes classify|token_classify, not {cfg.finetune.task}")
    return dataclasses.replace(
        bert.PRETRAINING_LAYERS,
        head=BertTokenHead if token else BertSequenceHead,
        head_args=(len(cfg.finetune.labels),),
        loss=TokenClassifyLoss if token else ClassifyLoss,
    )


def task_layers(cfg: Config) -> TaskLayers:
    """The layer variants of ``cfg.finetune.task`` (sft: packed inputs; classify: packed inputs and
    the classification head in place of the output layer)."""
    packed = TaskLayers(
        embedding=PackedEmbedding,
        tied_embedding=PackedTiedEmbedding,
        block=PackedBlock,
        packed=True,
        final_norm=PackedFinalNorm,
        loss=LMLoss,
    )
    if cfg.finetune.task == "classify":
        return dataclasses.replace(
            packed,
            final_norm_args=(True,),
            head=ClassificationHead,
            head_args=(len(cfg.finetune.labels),),
            loss=ClassifyLoss,
        )
    return packed


def eval_stats(
    task: str, out: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, tp: TensorParallel
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed loss, summed weight, class predictions or None) of one micro-batch's outputs, for exact
    validation averages (token-weighted for SFT and token classification, example-weighted for
    classification; predictions [b], token_classify [b, s]). ``tp``: the tensor-parallel group the
    logits are split over (sft)."""
    if task == "token_classify":
        loss = token_classify_loss(out, labels, loss_mask, 1.0)
        return loss, loss_mask.float().sum(), out.argmax(-1)
    if task == "classify":
        return classify_loss(out, labels, loss_mask, 1.0), loss_mask.sum(), out.argmax(-1)
    return lm_loss(out, labels, loss_mask, 1.0, tp=tp), loss_mask.float().sum(), None


def freeze(model: nn.Module, cfg: Config, params: dict) -> None:
    """LoRA: only adapters (and a classification head) train. Otherwise freeze_embeddings, the
    first freeze_layers blocks and (MoE) freeze_router. ``params``: the model's local parameters by
    layout key."""
    f = cfg.finetune
    for lp, param in params.values():
        if f.lora.rank:
            param.requires_grad = layout.is_added(lp.spec)
        elif (f.freeze_embeddings and lp.index == 0) or 1 <= lp.index <= f.freeze_layers:
            param.requires_grad = False
        elif f.freeze_router and lp.spec.name == "mlp.router.weight":
            param.requires_grad = False
