"""The fine-tuning model: pretraining's layers fed packed sequences, LoRA adapters on the tensor-parallel
projections, and a classification head on the last non-pad token.

Layers pass ``(hidden, positions, doc_ids)`` tuples (also between pipeline stages: DeepSpeed sends
integer tensors along and gives them no gradient); given a plain tensor they behave like pretraining's
layers, so ``bigtrain.generation`` runs a fine-tuned (LoRA) checkpoint unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import nn

from bigtrain.config import Config, ModelConfig
from bigtrain.models import layout
from bigtrain.models.llama import Embedding, FinalNorm, OutputLayer, TransformerBlock, lm_loss
from bigtrain.models.parallelize import (
    TiedEmbedding,
    initialize_weights,
    local_layers,
    local_parameters,
    megatron_config,
    tp_rank_size,
)

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden or tokens, positions, doc_ids


class _PackedInput:
    """Embedding forward that passes positions and document ids along (plain tokens: as pretraining)."""

    def forward(self, inputs: torch.Tensor | Packed):
        if torch.is_tensor(inputs):
            return super().forward(inputs)
        tokens, positions, doc_ids = inputs
        return super().forward(tokens), positions, doc_ids


class PackedEmbedding(_PackedInput, Embedding):
    pass


class PackedTiedEmbedding(_PackedInput, TiedEmbedding):
    """The tied output layer reads the embedding's weight outside the embedding's forward: ZeRO-3 has to
    gather it for that module too (else it finds the released, empty partition, as in validation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from deepspeed.runtime.zero import register_external_parameter

        register_external_parameter(self.output, self.word_embeddings.weight)  # a no-op below ZeRO-3


def _tied_logits(module: PackedTiedEmbedding, x: torch.Tensor) -> torch.Tensor:
    return module.logits(x)


class PackedBlock(TransformerBlock):
    def forward(self, inputs: torch.Tensor | Packed, cache=None):
        if torch.is_tensor(inputs):
            return super().forward(inputs, cache)
        x, positions, doc_ids = inputs
        return super().forward(x, None, positions, doc_ids), positions, doc_ids


class PackedFinalNorm(FinalNorm):
    """Drops positions; keeps document ids for the classification head (which pools by them)."""

    def __init__(self, m: ModelConfig, keep_doc_ids: bool):
        super().__init__(m)
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


class PipelineLoss:
    """The pipeline engine's loss on the last stage. In evaluation (no grad) ``lm_loss`` gets a copy of
    the logits: megatron's vocab-parallel cross-entropy works in place on its input (in fp32
    ``logits.float()`` is that very tensor), and ``eval_batch(return_logits=True)`` hands these logits
    back, which FinetuneTrainer scores itself (they would be exp(logits - max) otherwise)."""

    def __init__(self, task: str):
        self.task = task

    def __call__(self, outputs: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``labels``: (labels, loss_mask[, normalizer]); see ``lm_loss`` / ``classify_loss``."""
        if self.task == "classify":
            return classify_loss(outputs, *labels)
        return lm_loss(outputs if torch.is_grad_enabled() else outputs.clone(), *labels)


def finetune_specs(cfg: Config, mp: ModelParallelConfig) -> list[LayerSpec]:
    """The layer list (indices as in bigtrain.models.layout) for ``cfg.finetune.task``."""
    m, vocab = cfg.model, cfg.derived.padded_vocab_size
    classify = cfg.finetune.task == "classify"
    blocks = [LayerSpec(PackedBlock, m, mp, cfg.activation_checkpointing) for _ in range(m.num_layers)]
    norm = LayerSpec(PackedFinalNorm, m, classify)
    if classify:
        return [
            LayerSpec(PackedEmbedding, m, mp, vocab),
            *blocks,
            norm,
            LayerSpec(ClassificationHead, m, len(cfg.finetune.labels)),
        ]
    if m.tie_embeddings:
        tied = dict(tied_weight_attr="word_embeddings.weight")
        first = TiedLayerSpec("embed", PackedTiedEmbedding, cfg, mp, **tied)
        last = TiedLayerSpec("embed", PackedTiedEmbedding, cfg, mp, forward_fn=_tied_logits, **tied)
    else:
        first, last = LayerSpec(PackedEmbedding, m, mp, vocab), LayerSpec(OutputLayer, m, mp, vocab, False)
    return [first, *blocks, norm, last]


class FinetuneModel(nn.Module):
    """The layer list as one module (pipeline = 1), submodules named by list index like LanguageModel."""

    def __init__(self, cfg: Config, mp: ModelParallelConfig):
        super().__init__()
        self.tied = cfg.model.tie_embeddings and cfg.finetune.task == "sft"
        self.task = cfg.finetune.task
        specs = finetune_specs(cfg, mp)
        self.num_list_layers = len(specs)
        for index, spec in enumerate(specs):
            if not (self.tied and index == len(specs) - 1):
                self.add_module(str(index), spec.build())

    def outputs(self, tokens: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        """sft: this rank's vocab slice of the logits [s, b, v/tp]; classify: class logits [b, labels]."""
        x = (tokens, positions, doc_ids)
        for index in range(self.num_list_layers - 1):
            x = getattr(self, str(index))(x)
        if self.tied:
            return getattr(self, "0").logits(x)
        return getattr(self, str(self.num_list_layers - 1))(x)

    def forward(self, tokens, positions, doc_ids, labels, loss_mask, normalizer=None) -> torch.Tensor:
        """The loss of one micro-batch: its mean, or its sum over ``normalizer`` (see ``lm_loss``)."""
        outputs = self.outputs(tokens, positions, doc_ids)
        return PipelineLoss(self.task)(outputs, (labels, loss_mask, normalizer))

    @torch.no_grad()
    def evaluate_batch(self, tokens, positions, doc_ids, labels, loss_mask):
        return eval_stats(self.task, self.outputs(tokens, positions, doc_ids), labels, loss_mask)


def eval_stats(task: str, out: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor):
    """(summed loss, summed weight, class predictions [b] or None) of one micro-batch's outputs, for
    exact validation averages (token-weighted for SFT, example-weighted for classification)."""
    if task == "classify":
        return classify_loss(out, labels, loss_mask, 1.0), loss_mask.sum(), out.argmax(-1)
    return lm_loss(out, labels, loss_mask, 1.0), loss_mask.float().sum(), None


# ---------------------------------------------------------------------------- LoRA
class LoRADropout(nn.Module):
    """Inverted dropout on a LoRA adapter's input (PEFT's ``lora_dropout``), with the masks of the
    unsharded model: one Bernoulli mask over the full input features, of which a row-parallel adapter
    (whose input is this tensor rank's slice of the features) keeps its own slice, so tensor parallelism
    changes neither the mask nor how many random numbers are drawn; a column-parallel adapter's input is
    replicated and every tensor rank draws the same whole mask.

    The masks come from the global RNG, which every rank seeds alike (``train.seed``) and which only
    dropout draws from during training, so tensor ranks stay in step (and in step with a tensor = 1 run),
    and activation recomputation (torch.utils.checkpoint restores the global RNG) redraws the same masks.
    Data-parallel ranks draw the same masks for their different samples. Eval mode: the identity."""

    def __init__(self, p: float, rank: int = 0, size: int = 1):
        super().__init__()
        self.p, self.rank, self.size = p, rank, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        full = (*x.shape[:-1], x.shape[-1] * self.size)  # [s, b, in]
        keep = torch.empty(full, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        if self.size > 1:
            keep = keep.chunk(self.size, dim=-1)[self.rank]
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, tensor_slice={self.rank}/{self.size}"


class LoRAColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel base (output split) + scale * B @ A: A [r, in] replicated, B [out/tp, r] split
    like the base's rows. The adapter's hidden goes through megatron's copy-to-region so its gradient
    (and so A's and the input's) is all-reduced over tensor ranks, like the base's input gradient."""

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        h = copy_to_tensor_model_parallel_region(F.linear(self.lora_dropout(x), self.lora_A))  # [s, b, r]
        return out + F.linear(h, self.lora_B) * self.lora_scale, bias


class LoRARowParallelLinear(RowParallelLinear):
    """Row-parallel base (input split, output all-reduced) + scale * B @ A: A [r, in/tp] split like the
    base's columns, B [out, r] replicated. The rank-r partial product is all-reduced (cheap) before B."""

    def forward(self, x: torch.Tensor):
        out, bias = super().forward(x)
        h = reduce_from_tensor_model_parallel_region(F.linear(self.lora_dropout(x), self.lora_A))  # [s, b, r]
        return out + F.linear(h, self.lora_B) * self.lora_scale, bias


def add_lora(model: nn.Module, cfg: Config) -> None:
    """Give every targeted projection LoRA parameters (filled by initialize_weights via the layout
    table). The module's class is swapped rather than wrapped so the base weight keeps its name."""
    lora, m = cfg.finetune.lora, cfg.model
    tp_rank, tp = tp_rank_size()
    specs = {s.name: s for s in layout.lora_specs(m, cfg.finetune)}
    for layer in local_layers(model).values():
        if not isinstance(layer, TransformerBlock):
            continue
        for target in lora.targets:
            name, split = layout.LORA_TARGETS[target]
            module = layer.get_submodule(name)
            module.__class__ = LoRARowParallelLinear if split == "row" else LoRAColumnParallelLinear
            for ab in ("lora_A", "lora_B"):
                shape = layout.local_shape(specs[f"{name}.{ab}"], m, 0, tp)
                module.register_parameter(ab, nn.Parameter(torch.zeros(shape)))
            module.lora_scale = lora.alpha / lora.rank
            # a row-parallel adapter's input is this rank's slice of the features: it keeps that slice
            # of the full mask; a column-parallel adapter's input is whole on every rank
            module.lora_dropout = LoRADropout(lora.dropout, *((tp_rank, tp) if split == "row" else (0, 1)))


def freeze(model: nn.Module, cfg: Config) -> None:
    """LoRA: only adapters (and a classification head) train. Otherwise freeze_embeddings and the
    first freeze_layers blocks."""
    f = cfg.finetune
    for lp, param in local_parameters(model, cfg).values():
        if f.lora.rank:
            param.requires_grad = layout.is_finetune_param(lp.spec)
        elif (f.freeze_embeddings and lp.index == 0) or 1 <= lp.index <= f.freeze_layers:
            param.requires_grad = False


def build_finetune_model(cfg: Config, topology=None, base: str | None = None) -> nn.Module:
    """This rank's part of the fine-tuning model; ``base``: a bigtrain checkpoint (or convert_from_hf
    output) whose weights replace the init (adapters and a new classification head stay fresh)."""
    mp = megatron_config(cfg)
    if cfg.parallel.pipeline > 1:
        model = PipelineModule(
            layers=finetune_specs(cfg, mp),
            loss_fn=PipelineLoss(cfg.finetune.task),
            topology=topology,
            partition_method=cfg.parallel.partition_method,
            activation_checkpoint_interval=0,
        )
    else:
        model = FinetuneModel(cfg, mp)
    if cfg.finetune.lora.rank:
        add_lora(model, cfg)
    initialize_weights(model, cfg)
    if base:
        from bigtrain.checkpoint import load_weights_only

        load_weights_only(model, cfg, base)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
            print(
                f"loaded base weights from {base} (new adapters/head initialized; a resume overrides them)",
                flush=True,
            )
    freeze(model, cfg)
    return model
