"""All parallel wiring in one place: layer list -> DeepSpeed PipelineModule (pipeline > 1) or a plain
module (pipeline = 1, so ZeRO-2/3 and offload apply), megatron-core's parallel config, and the
layout-independent weight initialization / weights-only loading from :mod:`bigtrain.models.layout`.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from torch import nn

from bigtrain.config import Config
from bigtrain.models import layout
from bigtrain.models.llama import Embedding, FinalNorm, OutputLayer, TransformerBlock, lm_loss
from bigtrain.perf import set_compile

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def megatron_config(cfg: Config) -> ModelParallelConfig:
    """megatron-core's view of the layout. Weights are created in fp32 on CPU and filled by our init;
    DeepSpeed casts and moves them."""
    return ModelParallelConfig(
        tensor_model_parallel_size=cfg.parallel.tensor,
        pipeline_model_parallel_size=cfg.parallel.pipeline,
        sequence_parallel=cfg.parallel.sequence_parallel,
        params_dtype=torch.float32,
        pipeline_dtype=DTYPES[cfg.precision],
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )


class TiedEmbedding(Embedding):
    """Embedding that also computes the logits with its own weight (tied input/output embeddings)."""

    def __init__(self, cfg: Config, mp: ModelParallelConfig):
        super().__init__(cfg.model, mp, cfg.derived.padded_vocab_size)
        self.output = OutputLayer(cfg.model, mp, cfg.derived.padded_vocab_size, tied=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(x, weight=self.word_embeddings.weight)


def _tied_logits(module: TiedEmbedding, x: torch.Tensor) -> torch.Tensor:
    return module.logits(x)


def _pipeline_loss(logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The pipeline engine's loss: ``labels`` is (labels, loss_mask[, normalizer]) (see ``lm_loss``)."""
    return lm_loss(logits, *labels)


def layer_specs(cfg: Config, mp: ModelParallelConfig) -> list[LayerSpec]:
    """The model as a list: embedding, blocks, final norm, output layer (indices as in layout)."""
    m, vocab = cfg.model, cfg.derived.padded_vocab_size
    if m.tie_embeddings:
        first = TiedLayerSpec("embed", TiedEmbedding, cfg, mp, tied_weight_attr="word_embeddings.weight")
        last = TiedLayerSpec(
            "embed",
            TiedEmbedding,
            cfg,
            mp,
            forward_fn=_tied_logits,
            tied_weight_attr="word_embeddings.weight",
        )
    else:
        first = LayerSpec(Embedding, m, mp, vocab)
        last = LayerSpec(OutputLayer, m, mp, vocab, False)
    blocks = [LayerSpec(TransformerBlock, m, mp, cfg.activation_checkpointing) for _ in range(m.num_layers)]
    return [first, *blocks, LayerSpec(FinalNorm, m), last]


class LanguageModel(nn.Module):
    """The layer list as one module (pipeline = 1). Submodules are named by list index, like
    PipelineModule names them, so both forms share parameter naming."""

    def __init__(self, cfg: Config, mp: ModelParallelConfig):
        super().__init__()
        self.tied = cfg.model.tie_embeddings
        specs = layer_specs(cfg, mp)
        last = len(specs) - 1
        for index, spec in enumerate(specs):
            if self.tied and index == last:
                continue  # the output layer is the embedding module itself
            self.add_module(str(index), spec.build())
        self.num_list_layers = len(specs)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> this rank's vocab slice of the logits [s, b, v/tp]."""
        x = tokens
        for index in range(self.num_list_layers - 1):
            x = getattr(self, str(index))(x)
        head = getattr(self, "0") if self.tied else getattr(self, str(self.num_list_layers - 1))
        return head.logits(x) if self.tied else head(x)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        loss_mask: torch.Tensor,
        normalizer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, labels, loss_mask [b, s] -> the loss (``lm_loss``: mean unless ``normalizer`` is given)."""
        return lm_loss(self.logits(tokens), labels, loss_mask, normalizer)


def build_model(cfg: Config, topology=None) -> nn.Module:
    """Construct this rank's part of the model (weights initialized deterministically, fp32, CPU)."""
    set_compile(cfg.train.compile)  # the model's elementwise regions (bigtrain.perf)
    if cfg.finetune.task != "none":  # packed inputs, LoRA adapters or a classification head
        from bigtrain.finetune.model import build_finetune_model

        return build_finetune_model(cfg, topology)
    mp = megatron_config(cfg)
    if cfg.parallel.pipeline > 1:
        model = PipelineModule(
            layers=layer_specs(cfg, mp),
            loss_fn=_pipeline_loss,
            topology=topology,
            partition_method=cfg.parallel.partition_method,
            activation_checkpoint_interval=0,  # blocks recompute themselves (see TransformerBlock)
        )
    else:
        model = LanguageModel(cfg, mp)
    initialize_weights(model, cfg)
    return model


# ---------------------------------------------------------------------------- weights by layout key
def local_layers(model: nn.Module) -> dict[int, nn.Module]:
    """List index -> module for the layers this rank holds (a tied embedding appears under index 0)."""
    layers: dict[int, nn.Module] = {}
    for name, child in model.named_children():
        if name.isdigit():
            layers[int(name)] = child
    tied = getattr(model, "tied_modules", None)
    if tied is not None and "embed" in tied:
        layers[0] = tied["embed"]
    return layers


def local_parameters(model: nn.Module, cfg: Config) -> dict[str, tuple[layout.LayerParam, nn.Parameter]]:
    """Layout key ("index.name") -> (table entry, live parameter) for everything this rank holds."""
    layers = local_layers(model)
    out = {}
    for lp in layout.iter_layer_params(cfg.model, sorted(layers), cfg.finetune):
        out[lp.key] = (lp, layers[lp.index].get_parameter(lp.spec.name))
    return out


def tp_rank_size() -> tuple[int, int]:
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


@torch.no_grad()
def initialize_weights(model: nn.Module, cfg: Config) -> None:
    """Fill every local parameter with its shard of the layout-independent full init."""
    rank, size = tp_rank_size()
    for lp, param in local_parameters(model, cfg).values():
        full = layout.init_full(lp.spec, lp.index, cfg.model, cfg.derived.padded_vocab_size, cfg.train.seed)
        _assign(param, layout.shard(full, lp.spec.split, rank, size), lp.key)
        _mark_tensor_parallel(param, lp.spec.split, size)


@torch.no_grad()
def load_full_weights(model: nn.Module, cfg: Config, full: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors by layout key into this rank's shards; every key must exist."""
    rank, size = tp_rank_size()
    for key, (lp, param) in local_parameters(model, cfg).items():
        if key not in full:
            raise KeyError(f"weights have no tensor {key}")
        _assign(param, layout.shard(full[key], lp.spec.split, rank, size), key)


def _assign(param: nn.Parameter, value: torch.Tensor, key: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit parameter {tuple(param.shape)}")
    param.copy_(value.to(param.dtype))


def _mark_tensor_parallel(param: nn.Parameter, split: str, size: int) -> None:
    """megatron's attributes that DeepSpeed's grad-norm uses to count a sharded tensor on every rank
    (megatron only sets them when it initializes weights itself, which we skip)."""
    if split != "replicated" and size > 1:
        set_tensor_model_parallel_attributes(param, True, 1 if split == "row" else 0, 1)
