"""The one table of bigtrain's parameters: full shapes, tensor-parallel sharding, init, HF names.

Every piece that touches weights by name goes through this module: deterministic initialization (a
full tensor per parameter, generated from the seed and the parameter's name, then sharded, so every
parallel layout starts from the *same* model), weights-only loading at a different layout (merge then
re-shard), and Hugging Face conversion both ways. Keeping it table-driven is what makes "right at TP=1,
gibberish at TP=2" impossible by construction.

Layouts (full, unsharded, as bigtrain stores them):
- ``qkv``: rows grouped per key/value group g: ``[q heads of g (nh/nkv * d rows); k_g (d); v_g (d)]``.
  Tensor parallelism cuts whole groups, so a contiguous split of dim 0 is the right shard. The q/k/v
  bias (Qwen2) is laid out and split the same way, as the weight's output rows.
- ``gate_up``: ``[gate (ffn rows); up (ffn rows)]``; rank r holds ``[gate_r; up_r]``.
- ``vocab``/``col``: split on dim 0; ``row``: split on dim 1; ``replicated``: identical on every rank.
- ``expert_gate_up`` [experts, 2*f, h] / ``expert_row`` [experts, h, f]: a MoE block's stacked experts
  (``bigtrain.models.moe``): each expert split as ``gate_up`` / ``row`` over tensor ranks, and the expert
  dimension split over expert-parallel ranks (:func:`expert_shard`). Weight files hold every expert.
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
    split: str  # vocab | col | row | qkv | gate_up | replicated | expert_gate_up | expert_row
    init: str  # normal | scaled_normal | ones | zeros | lora_a
    hf: tuple[str, ...]  # HF name templates ({i} = block index); several for fused tensors
    shape: tuple[int, ...] | None = None  # full shape of fine-tuning additions (LoRA, classifier)
    when: str | None = None  # a boolean ModelConfig field: the parameter exists only where it is true
    dims: tuple[str, ...] | None = None  # full shape in named sizes (see DIMS) where the split's is not it


def specs_of(kind: str, m: ModelConfig) -> tuple[ParamSpec, ...]:
    """The table's parameters of one layer kind that this model (family and variant) has."""
    table = FAMILY_PARAMS[m.family]
    return tuple(spec for spec in table[kind] if spec.when is None or getattr(m, spec.when))


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
            "attention.qkv.bias",
            "qkv",
            "zeros",
            (
                "model.layers.{i}.self_attn.q_proj.bias",
                "model.layers.{i}.self_attn.k_proj.bias",
                "model.layers.{i}.self_attn.v_proj.bias",
            ),
            when="qkv_bias",
        ),
        ParamSpec(
            "attention.q_norm.weight",
            "replicated",
            "ones",
            ("model.layers.{i}.self_attn.q_norm.weight",),
            when="qk_norm",
        ),
        ParamSpec(
            "attention.k_norm.weight",
            "replicated",
            "ones",
            ("model.layers.{i}.self_attn.k_norm.weight",),
            when="qk_norm",
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
        ParamSpec("attention_out_norm.weight", "replicated", "ones", (), when="sandwich_norms"),  # HF_RENAMED
        ParamSpec(
            "mlp_out_norm.weight",
            "replicated",
            "ones",
            ("model.layers.{i}.post_feedforward_layernorm.weight",),
            when="sandwich_norms",
        ),
    ),
    FINAL_NORM: (ParamSpec("weight", "replicated", "ones", ("model.norm.weight",)),),
    HEAD: (ParamSpec("weight", "vocab", "normal", ("lm_head.weight",)),),
}


# A MoE block's MLP (``model.moe``) in place of ``mlp.gate_up`` / ``mlp.down``; HF Qwen2-MoE names ({e}: the
# expert), Mixtral's in HF_RENAMED
_MOE = "model.layers.{i}.mlp."
MOE_MLP_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("mlp.router.weight", "replicated", "normal", (f"{_MOE}gate.weight",), dims=("experts", "h")),
    ParamSpec(
        "mlp.experts.gate_up",
        "expert_gate_up",
        "normal",
        (f"{_MOE}experts.{{e}}.gate_proj.weight", f"{_MOE}experts.{{e}}.up_proj.weight"),
        dims=("experts", "2*expert_ffn", "h"),
    ),
    ParamSpec(
        "mlp.experts.down",
        "expert_row",
        "scaled_normal",
        (f"{_MOE}experts.{{e}}.down_proj.weight",),
        dims=("experts", "h", "expert_ffn"),
    ),
    ParamSpec(
        "mlp.shared_expert.gate_up.weight",
        "gate_up",
        "normal",
        (f"{_MOE}shared_expert.gate_proj.weight", f"{_MOE}shared_expert.up_proj.weight"),
        when="has_shared_expert",
        dims=("2*shared_ffn", "h"),
    ),
    ParamSpec(
        "mlp.shared_expert.down.weight",
        "row",
        "scaled_normal",
        (f"{_MOE}shared_expert.down_proj.weight",),
        when="has_shared_expert",
        dims=("h", "shared_ffn"),
    ),
    ParamSpec(
        "mlp.shared_expert_gate.weight",
        "replicated",
        "normal",
        (f"{_MOE}shared_expert_gate.weight",),
        when="has_shared_expert_gate",
        dims=("1", "h"),
    ),
)
DENSE_MLP = ("mlp.gate_up.weight", "mlp.down.weight")


def block_specs(m: ModelConfig, block: int) -> tuple[ParamSpec, ...]:
    """The table's parameters of block ``block`` (0-based): a MoE block's experts replace the dense MLP."""
    specs = specs_of(BLOCK, m)
    if not m.moe.is_moe_block(block):
        return specs
    moe = tuple(spec for spec in MOE_MLP_PARAMS if spec.when is None or getattr(m, spec.when))
    return tuple(spec for spec in specs if spec.name not in DENSE_MLP) + moe


def is_expert(spec: ParamSpec) -> bool:
    """A stacked-experts parameter: split over expert-parallel ranks on dim 0."""
    return spec.split.startswith("expert_")


def expert_shard(value: torch.Tensor, spec: ParamSpec, rank: int, size: int) -> torch.Tensor:
    """This expert-parallel rank's experts of a (tensor-sharded) parameter: rank r of ``size`` holds
    experts [r*E/size, (r+1)*E/size); any other parameter is whole on every expert rank."""
    if size == 1 or not is_expert(spec):
        return value
    return value.chunk(size, dim=0)[rank]


# The bert family (HF ``BertForPreTraining`` names). The list's slots: embedding, blocks, the pooler in the
# final-norm slot, the pretraining heads in the head slot; the MLM decoder is the (tied) word embedding.
# Post-LN blocks: ``attention_norm`` follows the attention's residual add, ``mlp_norm`` the MLP's.
_BLK = "bert.encoder.layer.{i}."


def _bert_norm(name: str, hf: str) -> tuple[ParamSpec, ParamSpec]:
    return (
        ParamSpec(f"{name}.weight", "replicated", "ones", (f"{hf}.weight",)),
        ParamSpec(f"{name}.bias", "replicated", "zeros", (f"{hf}.bias",)),
    )


def _bert_qkv(what: str, init: str) -> ParamSpec:
    return ParamSpec(
        f"attention.qkv.{what}",
        "qkv",
        init,
        tuple(f"{_BLK}attention.self.{p}.{what}" for p in ("query", "key", "value")),
    )


BERT_PARAMS: dict[str, tuple[ParamSpec, ...]] = {
    EMBED: (
        ParamSpec("word_embeddings.weight", "vocab", "normal", ("bert.embeddings.word_embeddings.weight",)),
        ParamSpec(
            "position_embeddings.weight",
            "replicated",
            "normal",
            ("bert.embeddings.position_embeddings.weight",),
            dims=("positions", "h"),
        ),
        ParamSpec(
            "token_type_embeddings.weight",
            "replicated",
            "normal",
            ("bert.embeddings.token_type_embeddings.weight",),
            dims=("types", "h"),
        ),
        *_bert_norm("norm", "bert.embeddings.LayerNorm"),
    ),
    BLOCK: (
        _bert_qkv("weight", "normal"),
        _bert_qkv("bias", "zeros"),
        ParamSpec("attention.proj.weight", "row", "scaled_normal", (f"{_BLK}attention.output.dense.weight",)),
        ParamSpec("attention.proj.bias", "replicated", "zeros", (f"{_BLK}attention.output.dense.bias",)),
        *_bert_norm("attention_norm", f"{_BLK}attention.output.LayerNorm"),
        ParamSpec(
            "mlp.fc1.weight", "col", "normal", (f"{_BLK}intermediate.dense.weight",), dims=("ffn", "h")
        ),
        ParamSpec("mlp.fc1.bias", "col", "zeros", (f"{_BLK}intermediate.dense.bias",), dims=("ffn",)),
        ParamSpec(
            "mlp.fc2.weight", "row", "scaled_normal", (f"{_BLK}output.dense.weight",), dims=("h", "ffn")
        ),
        ParamSpec("mlp.fc2.bias", "replicated", "zeros", (f"{_BLK}output.dense.bias",)),
        *_bert_norm("mlp_norm", f"{_BLK}output.LayerNorm"),
    ),
    FINAL_NORM: (  # the pooler
        ParamSpec("dense.weight", "replicated", "normal", ("bert.pooler.dense.weight",), dims=("h", "h")),
        ParamSpec("dense.bias", "replicated", "zeros", ("bert.pooler.dense.bias",)),
    ),
    HEAD: (
        ParamSpec(
            "transform.dense.weight",
            "replicated",
            "normal",
            ("cls.predictions.transform.dense.weight",),
            dims=("h", "h"),
        ),
        ParamSpec("transform.dense.bias", "replicated", "zeros", ("cls.predictions.transform.dense.bias",)),
        *_bert_norm("transform.norm", "cls.predictions.transform.LayerNorm"),
        ParamSpec("bias", "vocab", "zeros", ("cls.predictions.bias",), dims=("vocab",)),
        ParamSpec("nsp.weight", "replicated", "normal", ("cls.seq_relationship.weight",), dims=("2", "h")),
        ParamSpec("nsp.bias", "replicated", "zeros", ("cls.seq_relationship.bias",), dims=("2",)),
    ),
}
FAMILY_PARAMS: dict[str, dict[str, tuple[ParamSpec, ...]]] = {"llama": LAYER_PARAMS, "bert": BERT_PARAMS}


def _dims(m: ModelConfig, padded_vocab: int) -> dict[str, int]:
    """The named sizes ``ParamSpec.dims`` uses."""
    return {
        "h": m.hidden_size,
        "ffn": m.ffn_size,
        "vocab": padded_vocab,
        "positions": m.context_length,
        "types": m.type_vocab_size,
        "2": 2,
        "1": 1,
        "experts": m.moe.num_experts,
        "expert_ffn": m.expert_ffn_size,
        "2*expert_ffn": 2 * m.expert_ffn_size,
        "shared_ffn": m.moe.shared_expert_ffn_size,
        "2*shared_ffn": 2 * m.moe.shared_expert_ffn_size,
    }


def tied_params(m: ModelConfig) -> list[LayerParam]:
    """The parameters a tied head reads from the embedding (the word embedding), or none."""
    if not m.tie_embeddings:
        return []
    return [LayerParam(0, spec) for spec in specs_of(EMBED, m) if spec.name == "word_embeddings.weight"]


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
    if spec.dims is not None:
        sizes = _dims(m, padded_vocab)
        return tuple(sizes[dim] for dim in spec.dims)
    if spec.split == "vocab":
        return (padded_vocab, h)
    if spec.name in ("attention.q_norm.weight", "attention.k_norm.weight"):
        return (d,)
    if spec.split == "replicated":
        return (h,)
    if spec.name == "attention.qkv.bias":
        return ((m.num_attention_heads + 2 * m.kv_heads) * d,)
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
    if split == "expert_gate_up":  # [experts, 2f, h]: each expert's [gate_r; up_r]
        gate, up = full.chunk(2, dim=1)
        return torch.cat([gate.chunk(size, dim=1)[rank], up.chunk(size, dim=1)[rank]], dim=1)
    if split == "expert_row":  # [experts, h, f]
        return full.chunk(size, dim=2)[rank]
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
    if split == "expert_gate_up":
        halves = [s.chunk(2, dim=1) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1)
    if split == "expert_row":
        return torch.cat(shards, dim=2)
    raise KeyError(split)


# ---------------------------------------------------------------------------- deterministic init
def init_full(spec: ParamSpec, index: int, m: ModelConfig, padded_vocab: int, seed: int) -> torch.Tensor:
    """The full initial value of a parameter: depends on seed, layer index and name, never on layout."""
    shape = full_shape(spec, m, padded_vocab)
    if spec.init == "ones":  # a norm: the identity, which is weight 0 where it scales by 1 + weight
        return torch.zeros(shape) if m.norm_offset else torch.ones(shape)
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
        if kind == HEAD and m.tie_embeddings and m.family == "llama":  # the output layer is the embedding
            continue
        for spec in block_specs(m, index - 1) if kind == BLOCK else specs_of(kind, m):
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
    if tied is not None and "embed" in tied:  # the embedding, or (bert, last stage) the tied head
        module = tied["embed"]
        layers[num_list_layers(m) - 1 if getattr(module, "layout_kind", EMBED) == HEAD else 0] = module
    return layers


def local_layer_params(
    m: ModelConfig, layers: dict[int, torch.nn.Module], task: TaskParams = LM
) -> Iterator[tuple[LayerParam, torch.nn.Module]]:
    """(table entry, module holding it) for every parameter of the local ``layers`` (from
    :func:`local_layers`): a tied head away from the embedding (bert at pipeline > 1) holds its own
    copy of the word embedding, under the embedding's key."""
    for lp in iter_layer_params(m, sorted(layers), task):
        yield lp, layers[lp.index]
    head = num_list_layers(m) - 1
    if head in layers and 0 not in layers and task.head is None:
        for lp in tied_params(m):
            yield lp, layers[head]


# ---------------------------------------------------------------------------- HF mapping
def hf_names(lp: LayerParam, m: ModelConfig) -> tuple[str, ...]:
    """The parameter's HF tensor names in ``m.hf_model_type``'s checkpoints (one when that family fuses it).
    Stacked experts: one name per expert and template, expert by expert (``experts.0.gate``,
    ``experts.0.up``, ``experts.1.gate``, ...)."""
    templates = HF_RENAMED.get(m.hf_model_type, {}).get(lp.spec.name, lp.spec.hf)
    if is_expert(lp.spec):
        block = lp.index - 1
        return tuple(t.format(i=block, e=e) for e in range(m.moe.num_experts) for t in templates)
    return tuple(t.format(i=lp.index - 1) for t in templates)


def to_hf(lp: LayerParam, full: torch.Tensor, m: ModelConfig) -> dict[str, torch.Tensor]:
    """Full bigtrain tensor -> HF tensors (vocab padding stripped, fused tensors split)."""
    names = hf_names(lp, m)
    if lp.spec.split == "vocab":
        return {names[0]: full[: m.vocab_size]}
    if lp.spec.split == "qkv":
        d, nkv = m.head_dim, m.kv_heads
        q_per_group = m.num_attention_heads // nkv
        cols = full.shape[1:]  # (hidden size,), (LoRA rank,) for a B matrix, () for the bias
        grouped = full.view(nkv, q_per_group + 2, d, *cols)  # [groups, q.. k v, d, *cols]
        q = grouped[:, :q_per_group].reshape(-1, *cols)
        k = grouped[:, q_per_group].reshape(-1, *cols)
        v = grouped[:, q_per_group + 1].reshape(-1, *cols)
        return {names[0]: torch.cat([q, k, v])} if len(names) == 1 else dict(zip(names, (q, k, v)))
    if lp.spec.split == "gate_up":
        return {names[0]: full} if len(names) == 1 else dict(zip(names, full.chunk(2, dim=0)))
    if lp.spec.split == "expert_gate_up":  # [experts, 2f, h] -> per expert gate [f, h], up [f, h]
        parts = [half for expert in full for half in expert.chunk(2, dim=0)]
        return dict(zip(names, parts, strict=True))
    if lp.spec.split == "expert_row":  # [experts, h, f] -> per expert down [h, f]
        return dict(zip(names, full.unbind(0), strict=True))
    return {names[0]: full}


def from_hf(
    lp: LayerParam, tensors: dict[str, torch.Tensor], m: ModelConfig, padded_vocab: int
) -> torch.Tensor:
    """HF tensors -> full bigtrain tensor (inverse of :func:`to_hf`, vocab padded with zeros)."""
    names = hf_names(lp, m)
    if lp.spec.split == "vocab":
        src = tensors[names[0]]
        full = src.new_zeros(padded_vocab, *src.shape[1:])
        full[: src.shape[0]] = src
        return full
    if lp.spec.split == "qkv":
        d, nkv = m.head_dim, m.kv_heads
        cols = tensors[names[0]].shape[1:]  # (hidden size,) for the weight, () for the bias
        parts = [tensors[n] for n in names]
        if len(parts) == 1:  # fused [all q; all k; all v]
            parts = list(parts[0].split([m.num_attention_heads * d, nkv * d, nkv * d]))
        q = parts[0].reshape(nkv, -1, d, *cols)
        k = parts[1].reshape(nkv, 1, d, *cols)
        v = parts[2].reshape(nkv, 1, d, *cols)
        return torch.cat([q, k, v], dim=1).reshape(-1, *cols)
    if lp.spec.split == "gate_up":
        return torch.cat([tensors[n] for n in names], dim=0)  # fused: already [gate; up]
    if lp.spec.split == "expert_gate_up":  # names: expert by expert, gate then up
        pairs = zip(names[0::2], names[1::2])
        return torch.stack([torch.cat([tensors[gate], tensors[up]], dim=0) for gate, up in pairs])
    if lp.spec.split == "expert_row":
        return torch.stack([tensors[n] for n in names])
    return tensors[names[0]]


def hf_tensor_names(m: ModelConfig) -> list[str]:
    """Every HF tensor name of the model, in table order (what an HF directory must hold, and only that)."""
    return [name for lp in iter_layer_params(m) for name in hf_names(lp, m)]


# ---------------------------------------------------------------------------- HF config mapping
# bigtrain ``ModelConfig`` field <-> HF config field shared by every decoder family: the one config table,
# used by both directions. The variants' fields (head width, biases, q/k norm, window, rotary scaling) and
# the architecture follow in :func:`hf_variant_values` / :func:`model_values_from_hf`; the bert family has
# its own table (``FAMILY_HF_CONFIG_FIELDS`` keys them by ``model.family``).
HF_CONFIG_FIELDS: tuple[tuple[str, str], ...] = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("ffn_hidden_size", "intermediate_size"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("vocab_size", "vocab_size"),
    ("rope_theta", "rope_theta"),
    ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("init_std", "initializer_range"),
)
# The bert family's config fields (HF ``BertConfig``): no kv heads or rotary, LayerNorm's epsilon, token types.
BERT_HF_CONFIG_FIELDS: tuple[tuple[str, str], ...] = (
    ("num_layers", "num_hidden_layers"),
    ("hidden_size", "hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("ffn_hidden_size", "intermediate_size"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("vocab_size", "vocab_size"),
    ("type_vocab_size", "type_vocab_size"),
    ("norm_eps", "layer_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("init_std", "initializer_range"),
)
FAMILY_HF_CONFIG_FIELDS = {"llama": HF_CONFIG_FIELDS, "bert": BERT_HF_CONFIG_FIELDS}
# model.hf_model_type -> the HF class an export writes: the decoder families' causal-LM class, bert's
# pretraining model (MLM + NSP heads)
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "bert": "BertForPreTraining",
}
# model_type -> every HF class an import takes: :data:`HF_ARCHITECTURES`' and, for bert, the classes
# holding a subset of ``BertForPreTraining``'s tensors (the rest start from the table's init)
HF_IMPORT_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    **{kind: (arch,) for kind, arch in HF_ARCHITECTURES.items()},
    "bert": ("BertForPreTraining", "BertForMaskedLM", "BertModel"),
}
# HF class -> prefixes of the table's HF names that its checkpoints lack (``BertForMaskedLM`` is built
# without the pooler and has no NSP head; ``BertModel`` has no heads at all)
HF_ABSENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "BertForMaskedLM": ("bert.pooler.", "cls.seq_relationship."),
    "BertModel": ("cls.",),
}
# HF class -> the prefix the table's names carry that the class's own names do not (``BertModel`` is the
# ``bert.`` submodule of the pretraining model, saved at the top level)
HF_STRIPPED_PREFIX: dict[str, str] = {"BertModel": "bert."}
# the tied MLM decoder's HF names (bert): not stored by transformers; a checkpoint that stores them must hold
# the word embedding and the MLM bias there -> the table parameter's HF name it must equal
HF_TIED_ALIASES: dict[str, dict[str, str]] = {
    "bert": {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }
}
# family -> {bigtrain parameter: its HF names there} where they differ from ``ParamSpec.hf`` (Llama's).
# One name for a fused projection: Phi-3's ``qkv_proj`` is ``[all q heads; all k; all v]``,
# ``gate_up_proj`` ``[gate; up]``. Gemma 2's ``post_attention_layernorm`` follows the attention (our
# ``attention_out_norm``); the norm before its MLP is ``pre_feedforward_layernorm``.
HF_RENAMED: dict[str, dict[str, tuple[str, ...]]] = {
    "phi3": {
        "attention.qkv.weight": ("model.layers.{i}.self_attn.qkv_proj.weight",),
        "mlp.gate_up.weight": ("model.layers.{i}.mlp.gate_up_proj.weight",),
    },
    "gemma2": {
        "post_attention_norm.weight": ("model.layers.{i}.pre_feedforward_layernorm.weight",),
        "attention_out_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    },
}
HF_RENAMED["gemma3_text"] = HF_RENAMED["gemma2"]
# Mixtral's experts (``block_sparse_moe``; w1 gate, w3 up, w2 down); Qwen2-MoE's are MOE_MLP_PARAMS' own
_MIXTRAL = "model.layers.{i}.block_sparse_moe."
HF_RENAMED["mixtral"] = {
    "mlp.router.weight": (f"{_MIXTRAL}gate.weight",),
    "mlp.experts.gate_up": (f"{_MIXTRAL}experts.{{e}}.w1.weight", f"{_MIXTRAL}experts.{{e}}.w3.weight"),
    "mlp.experts.down": (f"{_MIXTRAL}experts.{{e}}.w2.weight",),
}
MOE_HF_TYPES = ("mixtral", "qwen2_moe")  # the HF classes with experts (config.validate_model_variant)
ROPE_KEYS = (  # RopeScalingConfig fields under their HF rope_parameters names (written when set)
    "factor",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
)


def hf_config_values(m: ModelConfig) -> dict[str, object]:
    """The family's shared HF config values of a bigtrain model (``LlamaConfig``'s, or ``BertConfig``'s for
    the bert family; defaults resolved: kv heads, ffn size, context; true vocab size)."""
    resolved = {
        "num_kv_heads": m.kv_heads,
        # Mixtral has no dense MLP: its intermediate_size is the experts' width
        "ffn_hidden_size": m.expert_ffn_size if m.hf_model_type == "mixtral" else m.ffn_size,
        "max_position_embeddings": m.context_length,
    }
    return {hf: resolved.get(ours, getattr(m, ours)) for ours, hf in FAMILY_HF_CONFIG_FIELDS[m.family]}


def hf_rope_parameters(m: ModelConfig) -> dict[str, object]:
    """HF's ``rope_parameters`` (transformers 5): type, theta and the scaling fields that are set."""
    r = m.rope_scaling
    if r.type == "none":
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    values = {k: getattr(r, k) for k in ROPE_KEYS if getattr(r, k) is not None}
    return {"rope_type": r.type, "rope_theta": m.rope_theta, **values}


def hf_variant_values(m: ModelConfig) -> dict[str, object]:
    """The family's own config.json fields: architecture, model_type, head_dim, rotary settings in both
    schemas (``rope_parameters``, transformers 5; ``rope_scaling`` next to ``rope_theta``, 4), biases and
    the sliding window as that family's config class writes them (Qwen: ``use_sliding_window``,
    ``max_window_layers`` and the ``layer_types`` they imply)."""
    kind = m.hf_model_type
    if kind == "bert":  # learned absolute positions, exact GELU, an encoder (no cache, no rotary)
        return {
            "architectures": [HF_ARCHITECTURES[kind]],
            "model_type": kind,
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
            "is_decoder": False,
            "add_cross_attention": False,
        }
    rope = hf_rope_parameters(m)
    scaling = None if m.rope_scaling.type == "none" else {k: v for k, v in rope.items() if k != "rope_theta"}
    out: dict[str, object] = {
        "architectures": [HF_ARCHITECTURES[kind]],
        "model_type": kind,
        "head_dim": m.head_dim,
        "hidden_act": "gelu_pytorch_tanh" if m.activation == "gelu_tanh" else "silu",
        "attention_dropout": 0.0,
        "rope_parameters": rope,
        "rope_scaling": scaling,
    }
    if kind in ("llama", "qwen3", "phi3", "gemma2", "gemma3_text"):
        out["attention_bias"] = False  # their flag puts a bias on the output projection too
    if kind == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    if kind in ("mistral", "phi3"):
        out["sliding_window"] = m.sliding_window
    if kind in ("gemma2", "gemma3_text"):
        out.update(
            hidden_activation=out["hidden_act"],
            query_pre_attn_scalar=m.query_pre_attn_scalar,
            attn_logit_softcapping=m.attn_logit_softcapping,
            final_logit_softcapping=m.final_logit_softcapping,
            sliding_window=m.sliding_window,
            layer_types=hf_layer_types(m),
            use_bidirectional_attention=None if kind == "gemma2" else False,
            cache_implementation="hybrid",  # as published: windowed caches for the sliding blocks
        )
    if kind == "gemma3_text":  # rotary per layer type; the pattern as Gemma3TextConfig records it
        local = {"rope_type": "default", "rope_theta": m.rope_local_theta or m.rope_theta}
        out["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
        out.update(sliding_window_pattern=m.window_pattern, _sliding_window_pattern=m.window_pattern)
    if kind == "phi3":
        original = m.rope_scaling.original_max_position_embeddings or m.context_length
        out.update(original_max_position_embeddings=original, resid_pdrop=0.0, embd_pdrop=0.0)
        out["rope_parameters"] = {**rope, "partial_rotary_factor": 1.0}  # Phi3Config writes it
    if kind in ("qwen2", "qwen3"):
        out.update(
            use_sliding_window=m.sliding_window is not None,
            sliding_window=m.sliding_window,
            max_window_layers=m.full_attention_layers,
            layer_types=hf_layer_types(m),
        )
    if kind in MOE_HF_TYPES:
        out.update(hf_moe_values(m))
    return out


def hf_moe_values(m: ModelConfig) -> dict[str, object]:
    """The MoE fields of HF's Mixtral / Qwen2-MoE config. ``router_aux_loss_coef`` is
    ``model.moe.aux_loss_coeff`` (both multiply the Switch load-balancing value E * sum_e f_e * P_e at one
    block's scale: HF pools every block's router logits into one value, bigtrain averages the blocks'
    values, equal for one block and of the same size for many; z-loss and capacity have no HF field: HF
    routes dropless without z-loss). ``output_router_logits`` is an output
    switch (HF adds the aux loss only when it is on), written false; an import keeps its own."""
    e = m.moe
    out: dict[str, object] = {
        "num_experts_per_tok": e.top_k,
        "router_aux_loss_coef": e.aux_loss_coeff,
        "output_router_logits": False,
    }
    if m.hf_model_type == "mixtral":  # every block sparse, renormalized top-k, no shared expert
        out.update(
            num_local_experts=e.num_experts,
            router_jitter_noise=0.0,
            sliding_window=m.sliding_window,
            head_dim=m.kv_channels,  # MixtralConfig's null: hidden / heads
        )
        return out
    out.update(  # qwen2_moe; HF's config sets sliding_window 0 when use_sliding_window is off
        num_experts=e.num_experts,
        moe_intermediate_size=m.expert_ffn_size,
        shared_expert_intermediate_size=e.shared_expert_ffn_size,
        norm_topk_prob=e.norm_topk_prob,
        decoder_sparse_step=e.layer_freq,
        mlp_only_layers=[],
        qkv_bias=m.qkv_bias,
        use_sliding_window=False,
        sliding_window=0,
        max_window_layers=m.full_attention_layers,
        layer_types=hf_layer_types(m),
    )
    return out


def hf_layer_types(m: ModelConfig) -> list[str]:
    """HF's ``layer_types``: which blocks use the sliding window (``ModelConfig.window_of``)."""
    return ["full_attention" if m.window_of(i) is None else "sliding_attention" for i in range(m.num_layers)]


def _full_attention_rope(params: dict) -> dict:
    """Rotary parameters given per layer type (Gemma 3): the full-attention blocks'; else as given."""
    return dict(params.get("full_attention") or params)


def hf_rope_scaling(hf: dict) -> dict[str, object]:
    """``model.rope_scaling`` values from either HF schema: ``rope_parameters`` (transformers 5), else
    ``rope_scaling`` (its ``type`` or ``rope_type``). Plain rotary: ``{}``. Unknown keys are kept, so
    that the config tree names them."""
    params = _full_attention_rope(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params.pop("rope_theta", None)
    if kind == "default":
        return {}
    return {"type": kind, **params}


def hf_rope_theta(hf: dict) -> float | None:
    theta = _full_attention_rope(hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta"))
    return None if theta is None else float(theta)


def model_values_from_hf(hf: dict[str, object]) -> dict[str, object]:
    """ModelConfig values from HF config values (keys missing in ``hf`` are left to bigtrain's defaults):
    the shared table, then the variant of the family ``model_type`` names. ``model_type`` bert: the bert
    family (what it cannot compute is for the importer to refuse first: ``tools/convert_from_hf.py``)."""
    if hf.get("model_type") == "bert":
        values = {ours: hf[name] for ours, name in BERT_HF_CONFIG_FIELDS if hf.get(name) is not None}
        return {**values, "family": "bert", "hf_model_type": "bert", "activation": "gelu"}
    values = {ours: hf[name] for ours, name in HF_CONFIG_FIELDS if hf.get(name) is not None}
    if (theta := hf_rope_theta(hf)) is not None:
        values["rope_theta"] = theta
    kind = str(hf.get("model_type", "llama"))
    values["hf_model_type"] = kind
    heads, hidden, head_dim = hf.get("num_attention_heads"), hf.get("hidden_size"), hf.get("head_dim")
    if isinstance(head_dim, int) and isinstance(heads, int) and head_dim * heads != hidden:
        values["kv_channels"] = head_dim  # only when it is not the default hidden/heads
    if kind == "qwen2":
        values["qkv_bias"] = True
    if kind == "qwen3":
        values["qk_norm"] = True
    if kind in ("mistral", "phi3", "gemma2", "gemma3_text") and hf.get("sliding_window") is not None:
        values["sliding_window"] = hf["sliding_window"]
    if kind in ("gemma2", "gemma3_text"):
        values.update(norm_offset=True, sandwich_norms=True, scale_embeddings=True, activation="gelu_tanh")
        values["window_pattern"] = 2  # HF's Gemma2Config: blocks 1, 3, ... attend to everything
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            values[name] = hf.get(name)
    if kind == "gemma3_text":
        values["qk_norm"] = True
        values["window_pattern"] = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        params = hf.get("rope_parameters")
        local: dict = (params.get("sliding_attention") if isinstance(params, dict) else None) or {}
        local_theta = local.get("rope_theta", hf.get("rope_local_base_freq"))
        if local_theta is not None:
            values["rope_local_theta"] = float(local_theta)
    if kind in ("qwen2", "qwen3"):
        if hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
            values["sliding_window"] = hf["sliding_window"]
        values["full_attention_layers"] = hf.get("max_window_layers", 0)
    if kind in MOE_HF_TYPES:
        moe_values_from_hf(hf, values)
    scaling = hf_rope_scaling(hf)
    scaling.pop("partial_rotary_factor", None)  # 1 (the whole head) or refused by the importer
    if kind == "phi3" and hf.get("original_max_position_embeddings") is not None:
        scaling.setdefault("original_max_position_embeddings", hf["original_max_position_embeddings"])
    if scaling:
        values["rope_scaling"] = scaling
    return values


def moe_values_from_hf(hf: dict[str, object], values: dict[str, object]) -> None:
    """Fill ``values`` (ModelConfig values) with a Mixtral / Qwen2-MoE config's experts (the inverse of
    :func:`hf_moe_values`). What bigtrain cannot express (router jitter, a window, ``mlp_only_layers``
    that make sparse blocks dense) is for the importer to refuse first (``tools/convert_from_hf.py``)."""
    kind = hf["model_type"]
    moe: dict[str, object] = {}
    if hf.get("num_experts_per_tok") is not None:
        moe["top_k"] = hf["num_experts_per_tok"]
    if hf.get("router_aux_loss_coef") is not None:
        moe["aux_loss_coeff"] = hf["router_aux_loss_coef"]
    if kind == "mixtral":
        moe.update(num_experts=hf.get("num_local_experts", 8), norm_topk_prob=True)
        if hf.get("sliding_window") is not None:
            values["sliding_window"] = hf["sliding_window"]
    else:  # qwen2_moe: a gated shared expert in every sparse block, dense MLPs between them
        moe.update(num_experts=hf.get("num_experts", 60), shared_expert_gate=True)
        for ours, name in (
            ("ffn_hidden_size", "moe_intermediate_size"),
            ("shared_expert_ffn_size", "shared_expert_intermediate_size"),
            ("norm_topk_prob", "norm_topk_prob"),
            ("layer_freq", "decoder_sparse_step"),
        ):
            if hf.get(name) is not None:
                moe[ours] = hf[name]
        values["qkv_bias"] = hf.get("qkv_bias", True)  # transformers 4's Qwen2-MoE always has the biases
        values["full_attention_layers"] = hf.get("max_window_layers", 0)
    values["moe"] = moe


# ---------------------------------------------------------------------------- pipeline stages
def local_shape(spec: ParamSpec, m: ModelConfig, padded_vocab: int, tp: int) -> tuple[int, ...]:
    """Shape of one tensor-parallel rank's slice (what :func:`shard` returns)."""
    shape = list(full_shape(spec, m, padded_vocab))
    if spec.split in ("vocab", "col", "qkv", "gate_up"):
        shape[0] //= tp
    elif spec.split in ("row", "expert_gate_up"):
        shape[1] //= tp
    elif spec.split == "expert_row":
        shape[2] //= tp
    return tuple(shape)


def list_layer_param_counts(m: ModelConfig, padded_vocab: int, tp: int) -> list[int]:
    """Parameters per list layer on one tensor rank, counted the way DeepSpeed's PipelineModule counts
    them for ``partition_method=parameters`` (a tied output layer is the embedding module again)."""
    counts = []
    for index in range(num_list_layers(m)):
        kind = layer_kind(index, m.num_layers)
        specs = block_specs(m, index - 1) if kind == BLOCK else specs_of(kind, m)
        if kind == HEAD and m.tie_embeddings:  # the tied module: the embedding again (llama) or a head
            own = specs if m.family != "llama" else ()  # that holds its copy of the word embedding (bert)
            specs = (*own, *(lp.spec for lp in tied_params(m)))
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
    tied = tied_params(m) if head in indices and 0 not in indices else []
    return [*tied, *iter_layer_params(m, indices)]
