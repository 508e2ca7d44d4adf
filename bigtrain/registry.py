"""The composition root: which model family and task a config names, and how it is built.

Every entry point (pretrain, finetune, evaluate, generation, the tools) builds its model through
:func:`build_model`, and every piece that touches parameters by layout key asks
:func:`local_parameters` / :func:`task_params`. One :class:`TrainSpec` per (family, task) says which
layer variants the task puts in the layer list, which parameters it adds to the layout table, and
which transforms run after the build (as torchtitan's ``TrainSpec`` registry).

Adding a model family: its model file under ``bigtrain/models/`` (a model class with
``layer_specs``), its rows in the layout table, and a :func:`register` call here. Adding a task: its
layer variants and parameter specs (as ``bigtrain/finetune/``) and a :func:`register` call here.
Dependencies point one way: this module imports the families (``bigtrain/models/``) and the tasks'
layers and parameters (``bigtrain/finetune/model.py``, ``lora.py``, ``params.py``); they never import it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from bigtrain.batch import BERT_BATCH, LM_BATCH, PACKED_BATCH, BatchAdapter
from bigtrain.config import MODEL_FAMILIES, Config, ConfigError
from bigtrain.finetune import lora
from bigtrain.finetune import model as finetune_model
from bigtrain.finetune import params as finetune_params
from bigtrain.models import bert, layout, parallelize
from bigtrain.models.layers import TensorParallel
from bigtrain.models.llama import LM_LAYERS, LlamaModel, TaskLayers

Transform = Callable[[nn.Module, Config, TensorParallel], None]


@dataclass(frozen=True)
class TrainSpec:
    """How one (model family, task) is built."""

    family: str
    task: str  # "none" (pretraining) | "sft" | "classify" | "token_classify" (cfg.finetune.task)
    model: (
        type[LlamaModel] | type[bert.BertModel]
    )  # the family's model class (its layer_specs feed the pipeline engine)
    layers: Callable[[Config], TaskLayers]  # layer variants put in the list
    params: Callable[[Config], layout.TaskParams]  # parameters added to the layout table
    transforms: tuple[Transform, ...] = ()  # after the build, before the init (e.g. LoRA)
    finalize: tuple[Transform, ...] = ()  # after the init (e.g. which parameters train)
    batch: BatchAdapter = LM_BATCH  # what the pretraining trainer feeds the model (fine-tuning: its own)
    # with data.document_mask (its layers(cfg) then take packed inputs); None: not supported
    document_batch: BatchAdapter | None = None


_SPECS: dict[tuple[str, str], TrainSpec] = {}


def register(spec: TrainSpec) -> None:
    """Add a (family, task) entry; ValueError if it exists or the family is unknown to the config."""
    key = (spec.family, spec.task)
    if key in _SPECS:
        raise ValueError(f"{key} is already registered")
    if spec.family not in MODEL_FAMILIES:
        raise ValueError(f"model family {spec.family!r} is not in bigtrain.config.MODEL_FAMILIES")
    _SPECS[key] = spec


def train_spec(cfg: Config) -> TrainSpec:
    """The entry for ``cfg.model.family`` x ``cfg.finetune.task``; ValueError naming what exists. With
    ``data.document_mask`` its batch adapter is the entry's ``document_batch`` (ConfigError if it has none)."""
    key = (cfg.model.family, cfg.finetune.task)
    if key not in _SPECS:
        raise ValueError(
            f"no model is registered for model.family={key[0]} finetune.task={key[1]}; have {sorted(_SPECS)}"
        )
    spec = _SPECS[key]
    if cfg.data.document_mask:
        if spec.document_batch is None:
            raise ConfigError(
                f"data.document_mask is not supported for model.family={key[0]} finetune.task={key[1]}"
            )
        return dataclasses.replace(spec, batch=spec.document_batch)
    return spec


def task_params(cfg: Config) -> layout.TaskParams:
    """What ``cfg``'s task adds to the layout table (LoRA adapters, a classification head)."""
    return train_spec(cfg).params(cfg)


def local_parameters(model: nn.Module, cfg: Config) -> dict[str, tuple[layout.LayerParam, nn.Parameter]]:
    """Layout key -> (table entry, live parameter) for everything this rank of ``model`` holds."""
    return parallelize.local_parameters(model, cfg, task_params(cfg))


def build_model(cfg: Config, topology: object | None = None) -> nn.Module:
    """This rank's part of the model ``cfg`` names (weights initialized deterministically, fp32, CPU;
    a ``PipelineModule`` when ``parallel.pipeline > 1``); trainable parameters as the task says.
    Pretrained weights are loaded by the caller (``checkpoint.load_weights_only``)."""
    spec = train_spec(cfg)
    task = spec.params(cfg)
    model = parallelize.build(cfg, spec.model, spec.layers(cfg), task, topology)
    tp = parallelize.tensor_parallel(cfg)
    for transform in spec.transforms:
        transform(model, cfg, tp)
    parallelize.initialize_weights(model, cfg, task)
    for transform in spec.finalize:
        transform(model, cfg, tp)
    return model


# ---------------------------------------------------------------------------- the entries
def _add_lora(model: nn.Module, cfg: Config, tp: TensorParallel) -> None:
    if cfg.finetune.lora.rank:
        lora.add_lora(layout.local_layers(model, cfg.model), cfg.model, cfg, tp)


def _freeze(model: nn.Module, cfg: Config, tp: TensorParallel) -> None:
    finetune_model.freeze(model, cfg, local_parameters(model, cfg))


# data.document_mask: pretraining's layers fed (tokens, positions, doc_ids) as SFT's packed sequences
# (attention within a document, rotary positions per document); the same parameters as LM_LAYERS
PACKED_LM_LAYERS = dataclasses.replace(
    LM_LAYERS,
    embedding=finetune_model.PackedEmbedding,
    tied_embedding=finetune_model.PackedTiedEmbedding,
    block=finetune_model.PackedBlock,
    final_norm=finetune_model.PackedFinalNorm,
    packed=True,
)


def _lm_layers(cfg: Config) -> TaskLayers:
    return PACKED_LM_LAYERS if cfg.data.document_mask else LM_LAYERS


register(
    TrainSpec(
        "llama",
        "none",
        model=LlamaModel,
        layers=_lm_layers,
        params=lambda cfg: layout.LM,
        document_batch=PACKED_BATCH,
    )
)
for _task in ("sft", "classify"):
    register(
        TrainSpec(
            "llama",
            _task,
            model=LlamaModel,
            layers=finetune_model.task_layers,
            params=finetune_params.task_params,
            transforms=(_add_lora,),
            finalize=(_freeze,),
        )
    )


def _bert_pretraining_layers(cfg: Config) -> TaskLayers:
    nsp = cfg.data.masking.sentence_pair != "none"
    return dataclasses.replace(
        bert.PRETRAINING_LAYERS, loss=functools.partial(bert.BertPretrainingLoss, nsp=nsp)
    )


register(
    TrainSpec(
        "bert",
        "none",
        model=bert.BertModel,
        layers=_bert_pretraining_layers,
        params=lambda cfg: layout.LM,
        batch=BERT_BATCH,
    )
)
for _task in ("classify", "token_classify"):
    register(
        TrainSpec(
            "bert",
            _task,
            model=bert.BertModel,
            layers=finetune_model.bert_task_layers,
            params=finetune_params.task_params,
            transforms=(_add_lora,),
            finalize=(_freeze,),
        )
    )
