"""The one table of bigtrain's parameters: full shapes, tensor-parallel sharding, init, HF names.

Every piece that touches weights by name goes through this module: deterministic initialization (a
full tensor per parameter, generated from the seed and the parameter's name, then sharded, so every
parallel layout starts from the *same* model), weights-only loading at a different layout (merge then
re-shard), and Hugging Face conversion both ways. Keeping it table-driven is what makes "right at TP=1,
gibberish at TP=2" impossible by construction.

Layouts (full, unsharded, as bigtrain stores them):
- ``qkv``: rows grouped per key/value group g: ``[q heads of g (nh/nkv * d rows); k_g (d); v_g (d)]``.
  Tensor parallelism cuts whole groups, so a contiguous split of dim 0 is the right shard.
- ``gate_up``: ``[gate (ffn rows); up (ffn rows)]``; rank r holds ``[gate_r; up_r]``.
- ``vocab``/``col``: split on dim 0; ``row``: split on dim 1; ``replicated``: identical on every rank.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from bigtrain.config import ModelConfig

if TYPE_CHECKING:
    from bigtrain.models.llama import LlamaModel

# Layer kinds in the layer list: 0 = embedding, 1..L = blocks, L+1 = final norm, L+2 = output layer.
EMBED, BLOCK, FINAL_NORM, HEAD = "embed", "block", "final_norm", "head"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of one layer kind."""

    name: str  # name inside the layer module
    split: str  # vocab | col | row | qkv | gate_up | replicated
    init: str  # normal | scaled_normal | ones | zeros | lora_a
    hf: tuple[str, ...]  # HF name templates ({i} = block index); several for fused tensors
    shape: tuple[int, ...] | None = None  # full shape of fine-tuning additions (LoRA, classifier)


LAYER_PARAMS: dict[str, tuple[ParamSpec, ...]] = {
    EMBED: (ParamSpec("word_embeddings.weight", "vocab", "normal", ("model.embed_tokens.weight",)),),
    BLOCK: (
        ParamSpec("input_norm.weight", "replicated", "ones", ("model.layers.{i}.input_layernorm.weight",)),
        ParamSpec(
            "attention.qkv.weight",
            "qkv",
            "normal",
            (
                "model.layers.{i}.self_attn.q_proj.weight",
                "model.layers.{i}.self_attn.k_proj.weight",
                "model.layers.{i}.self_attn.v_proj.weight",
            ),
        ),
        ParamSpec(
            "attention.proj.weight", "row", "scaled_normal", ("model.layers.{i}.self_attn.o_proj.weight",)
        ),
        ParamSpec(
            "post_attention_norm.weight",
            "replicated",
            "ones",
            ("model.layers.{i}.post_attention_layernorm.weight",),
        ),
        ParamSpec(
            "mlp.gate_up.weight",
            "gate_up",
            "normal",
            ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        ),
        ParamSpec("mlp.down.weight", "row", "scaled_normal", ("model.layers.{i}.mlp.down_proj.weight",)),
    ),
    FINAL_NORM: (ParamSpec("weight", "replicated", "ones", ("model.norm.weight",)),),
    HEAD: (ParamSpec("weight", "vocab", "normal", ("lm_head.weight",)),),
}


# ---------------------------------------------------------------------------- task additions
@dataclass(frozen=True)
class TaskParams:
    """Parameters a task adds to the table (supplied by bigtrain.registry; fine-tuning's LoRA adapters
    and classification head): ``block`` specs added to every block, ``head`` specs replacing the
    language-model output layer. Added specs carry their full ``shape``."""

    block: tuple[ParamSpec, ...] = ()
    head: tuple[ParamSpec, ...] | None = None


LM = TaskParams()  # the language model as pretrained: nothing added


def is_added(spec: ParamSpec) -> bool:
    """Added by a task (absent from pretrained checkpoints; initialized fresh)."""
    return spec.shape is not None


def layer_kind(index: int, num_layers: int) -> str:
    """Kind of the layer at position ``index`` of the layer list."""
    if index == 0:
        return EMBED
    if index <= num_layers:
        return BLOCK
    return FINAL_NORM if index == num_layers + 1 else HEAD


def num_list_layers(m: ModelConfig) -> int:
    return m.num_layers + 3


def full_shape(spec: ParamSpec, m: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the unsharded parameter."""
    h, d = m.hidden_size, m.head_dim
    if spec.shape is not None:
        return spec.shape
    if spec.split == "vocab":
        return (padded_vocab, h)
    if spec.split == "replicated":
        return (h,)
    if spec.split == "qkv":
        return ((m.num_attention_heads + 2 * m.kv_heads) * d, h)
    if spec.split == "gate_up":
        return (2 * m.ffn_size, h)
    if spec.name == "attention.proj.weight":
        return (h, m.num_attention_heads * d)
    if spec.name == "mlp.down.weight":
        return (h, m.ffn_size)
    raise KeyError(spec.name)


# ---------------------------------------------------------------------------- shard / merge
def shard(full: torch.Tensor, split: str, rank: int, size: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full parameter."""
    if split == "replicated" or size == 1:
        return full
    if split in ("vocab", "col", "qkv"):
        return full.chunk(size, dim=0)[rank]
    if split == "row":
        return full.chunk(size, dim=1)[rank]
    if split == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    raise KeyError(split)


def merge(shards: list[torch.Tensor], split: str, name: str = "") -> torch.Tensor:
    """Inverse of :func:`shard` over all ranks' slices (replicated ones must agree)."""
    if split == "replicated" or len(shards) == 1:
        for i, s in enumerate(shards[1:], 1):
            if not torch.equal(s, shards[0]):
                raise ValueError(f"replicated parameter {name} differs between tensor ranks 0 and {i}")
        return shards[0]
    if split in ("vocab", "col", "qkv"):
        return torch.cat(shards, dim=0)
    if split == "row":
        return torch.cat(shards, dim=1)
    if split == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise KeyError(split)


# ---------------------------------------------------------------------------- deterministic init
def init_full(spec: ParamSpec, index: int, m: ModelConfig, padded_vocab: int, seed: int) -> torch.Tensor:
    """The full initial value of a parameter: depends on seed, layer index and name, never on layout."""
    shape = full_shape(spec, m, padded_vocab)
    if spec.init == "ones":
        return torch.ones(shape)
    if spec.init == "zeros":
        return torch.zeros(shape)
    std = m.init_std / (2 * m.num_layers) ** 0.5 if spec.init == "scaled_normal" else m.init_std
    if spec.init == "lora_a":
        std = shape[1] ** -0.5  # like PEFT's kaiming-uniform A: B @ A starts at 0 through B = 0
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{index}:{spec.name}".encode()))
    full = torch.randn(shape, generator=gen) * std
    if spec.split == "vocab":
        full[m.vocab_size :] = 0  # padding rows never receive a real token
    return full


@dataclass(frozen=True)
class LayerParam:
    """One parameter of one list layer, with everything needed to place it."""

    index: int  # position in the layer list
    spec: ParamSpec

    @property
    def key(self) -> str:
        """Layout-independent name used in bigtrain weight files."""
        return f"{self.index}.{self.spec.name}"


def iter_layer_params(
    m: ModelConfig, indices: range | list[int] | None = None, task: TaskParams = LM
) -> Iterator[LayerParam]:
    """All parameters of the given list layers (default: the whole model), in order, with what ``task``
    adds to every block and puts in place of the output layer."""
    for index in indices if indices is not None else range(num_list_layers(m)):
        kind = layer_kind(index, m.num_layers)
        if kind == HEAD and task.head is not None:
            yield from (LayerParam(index, spec) for spec in task.head)
            continue
        if kind == HEAD and m.tie_embeddings:
            continue
        for spec in LAYER_PARAMS[kind]:
            yield LayerParam(index, spec)
        if kind == BLOCK:
            for spec in task.block:
                yield LayerParam(index, spec)


# ---------------------------------------------------------------------------- roles in the model
def local_layers(model: torch.nn.Module, m: ModelConfig) -> dict[int, torch.nn.Module]:
    """Layer-list index -> module, for the layers this rank holds: the roles of a ``LlamaModel``
    (embedding, blocks, final_norm, output) or a ``PipelineModule``'s numbered layers (a tied
    embedding appears under index 0, and is also the tied output layer)."""
    if hasattr(model, "blocks"):  # LlamaModel: the whole list, by role
        lm = cast("LlamaModel", model)
        layers: dict[int, torch.nn.Module] = {0: lm.embedding, m.num_layers + 1: lm.final_norm}
        layers.update({i + 1: block for i, block in enumerate(lm.blocks)})
        if lm.output is not None:
            layers[m.num_layers + 2] = lm.output
        return layers
    layers = {int(name): child for name, child in model.named_children() if name.isdigit()}
    tied = getattr(model, "tied_modules", None)
    if tied is not None and "embed" in tied:
        layers[0] = tied["embed"]
    return layers


# ---------------------------------------------------------------------------- HF mapping
def hf_names(lp: LayerParam, m: ModelConfig) -> tuple[str, ...]:
    return tuple(t.format(i=lp.index - 1) for t in lp.spec.hf)


def to_hf(lp: LayerParam, full: torch.Tensor, m: ModelConfig) -> dict[str, torch.Tensor]:
    """Full bigtrain tensor -> HF tensors (vocab padding stripped, fused tensors split)."""
    names = hf_names(lp, m)
    if lp.spec.split == "vocab":
        return {names[0]: full[: m.vocab_size]}
    if lp.spec.split == "qkv":
        d, nkv = m.head_dim, m.kv_heads
        q_per_group = m.num_attention_heads // nkv
        cols = full.shape[1]  # hidden size (or the LoRA rank for a B matrix)
        grouped = full.view(nkv, q_per_group + 2, d, cols)  # [groups, q.. k v, d, cols]
        q = grouped[:, :q_per_group].reshape(-1, cols)
        k = grouped[:, q_per_group].reshape(-1, cols)
        v = grouped[:, q_per_group + 1].reshape(-1, cols)
        return dict(zip(names, (q, k, v)))
    if lp.spec.split == "gate_up":
        return dict(zip(names, full.chunk(2, dim=0)))
    return {names[0]: full}


def from_hf(
    lp: LayerParam, tensors: dict[str, torch.Tensor], m: ModelConfig, padded_vocab: int
) -> torch.Tensor:
    """HF tensors -> full bigtrain tensor (inverse of :func:`to_hf`, vocab padded with zeros)."""
    names = hf_names(lp, m)
    if lp.spec.split == "vocab":
        src = tensors[names[0]]
        full = src.new_zeros(padded_vocab, src.shape[1])
        full[: src.shape[0]] = src
        return full
    if lp.spec.split == "qkv":
        d, nkv, h = m.head_dim, m.kv_heads, m.hidden_size
        q = tensors[names[0]].view(nkv, -1, d, h)
        k = tensors[names[1]].view(nkv, 1, d, h)
        v = tensors[names[2]].view(nkv, 1, d, h)
        return torch.cat([q, k, v], dim=1).reshape(-1, h)
    if lp.spec.split == "gate_up":
        return torch.cat([tensors[names[0]], tensors[names[1]]], dim=0)
    return tensors[names[0]]


def hf_tensor_names(m: ModelConfig) -> list[str]:
    """Every HF tensor name of the model, in table order (what an HF directory must hold, and only that)."""
    return [name for lp in iter_layer_params(m) for name in hf_names(lp, m)]


# ---------------------------------------------------------------------------- HF config mapping
# bigtrain ``ModelConfig`` field <-> ``LlamaConfig`` field: the one config table, used by both directions.
HF_CONFIG_FIELDS: tuple[tuple[str, str], ...] = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("ffn_hidden_size", "intermediate_size"),
    ("seq_length", "max_position_embeddings"),
    ("vocab_size", "vocab_size"),
    ("rope_theta", "rope_theta"),
    ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("init_std", "initializer_range"),
)


def hf_config_values(m: ModelConfig) -> dict[str, object]:
    """LlamaConfig values of a bigtrain model (defaults resolved: kv heads, ffn size; true vocab size)."""
    resolved = {"num_kv_heads": m.kv_heads, "ffn_hidden_size": m.ffn_size}
    return {hf: resolved.get(ours, getattr(m, ours)) for ours, hf in HF_CONFIG_FIELDS}


def model_values_from_hf(hf: dict[str, object]) -> dict[str, object]:
    """ModelConfig values from HF config values (keys missing in ``hf`` are left to bigtrain's defaults)."""
    return {ours: hf[name] for ours, name in HF_CONFIG_FIELDS if hf.get(name) is not None}


# ---------------------------------------------------------------------------- pipeline stages
def local_shape(spec: ParamSpec, m: ModelConfig, padded_vocab: int, tp: int) -> tuple[int, ...]:
    """Shape of one tensor-parallel rank's slice (what :func:`shard` returns)."""
    shape = list(full_shape(spec, m, padded_vocab))
    if spec.split in ("vocab", "col", "qkv", "gate_up"):
        shape[0] //= tp
    elif spec.split == "row":
        shape[1] //= tp
    return tuple(shape)


def list_layer_param_counts(m: ModelConfig, padded_vocab: int, tp: int) -> list[int]:
    """Parameters per list layer on one tensor rank, counted the way DeepSpeed's PipelineModule counts
    them for ``partition_method=parameters`` (a tied output layer is the embedding module again)."""
    counts = []
    for index in range(num_list_layers(m)):
        kind = layer_kind(index, m.num_layers)
        specs = LAYER_PARAMS[EMBED if kind == HEAD and m.tie_embeddings else kind]
        counts.append(sum(torch.Size(local_shape(s, m, padded_vocab, tp)).numel() for s in specs))
    return counts


def pipeline_parts(m: ModelConfig, padded_vocab: int, tp: int, pp: int, method: str) -> list[int]:
    """Stage boundaries over the layer list (``parts[s]:parts[s+1]`` is stage s), computed with
    DeepSpeed's own partitioners, so they equal what ``PipelineModule(partition_method=method)`` builds."""
    from deepspeed.runtime import utils as ds_utils

    if method == "uniform":
        return [int(x) for x in ds_utils.partition_uniform(num_items=num_list_layers(m), num_parts=pp)]
    if method == "parameters":
        counts = list_layer_param_counts(m, padded_vocab, tp)
        return [int(x) for x in ds_utils.partition_balanced(weights=counts, num_parts=pp)]
    raise ValueError(f"partition_method {method!r}: expected parameters|uniform")


def stage_params(m: ModelConfig, parts: list[int], stage: int) -> list[LayerParam]:
    """Parameters held by pipeline stage ``stage`` (a stage holding the tied output layer holds the
    embedding weight too, as DeepSpeed's TiedLayerSpec does)."""
    indices = list(range(parts[stage], parts[stage + 1]))
    head = num_list_layers(m) - 1
    if m.tie_embeddings and head in indices and 0 not in indices:
        indices = [0, *indices]
    return list(iter_layer_params(m, indices))
