"""The parameters fine-tuning adds to the layout table: LoRA adapters on the blocks' projections and
the classification head in place of the output layer. Tables only (no DeepSpeed or megatron-core), so
the export and inspection tools read fine-tuned checkpoints without the training stack.
"""

from __future__ import annotations

from bigtrain.config import Config, FinetuneConfig, ModelConfig
from bigtrain.models import layout

SCORE = "score.weight"  # classification head (LlamaForSequenceClassification's ``score``)
# bert's heads: BertForSequenceClassification's / BertForTokenClassification's ``classifier`` (with bias)
CLASSIFIER = ("classifier.weight", "classifier.bias")

# LoRA target -> (projection module inside a block, its weight's split). Column-parallel bases (split on
# the output dim) get A [r, in] replicated and B [out, r] split like the base's rows; row-parallel bases
# (split on the input dim) get A [r, in] split on its input dim and B [out, r] replicated.
LORA_TARGETS: dict[str, tuple[str, str]] = {
    "qkv": ("attention.qkv", "qkv"),
    "proj": ("attention.proj", "row"),
    "gate_up": ("mlp.gate_up", "gate_up"),
    "down": ("mlp.down", "row"),
}
# The bert family's MLP is fc2(gelu(fc1(x))): the targets' names keep their role (gate_up: the MLP's
# input projection, column-parallel; down: its output projection, row-parallel).
BERT_LORA_TARGETS: dict[str, tuple[str, str]] = {
    "qkv": ("attention.qkv", "qkv"),
    "proj": ("attention.proj", "row"),
    "gate_up": ("mlp.fc1", "col"),
    "down": ("mlp.fc2", "row"),
}
FAMILY_LORA_TARGETS = {"llama": LORA_TARGETS, "bert": BERT_LORA_TARGETS}


def lora_target(m: ModelConfig, target: str) -> tuple[str, str]:
    """(projection module inside a block, its weight's split) of a ``finetune.lora.targets`` name in
    ``m``'s family; ValueError naming the family's targets when it has no such projection."""
    targets = FAMILY_LORA_TARGETS[m.family]
    if target not in targets:
        raise ValueError(
            f"finetune.lora.targets: {target!r} is not a projection of model.family {m.family} "
            f"({'|'.join(targets)})"
        )
    return targets[target]


def lora_specs(m: ModelConfig, finetune: FinetuneConfig | None) -> tuple[layout.ParamSpec, ...]:
    """ParamSpecs of one block's LoRA adapters (``finetune``: a FinetuneConfig; none when rank is 0)."""
    if finetune is None or finetune.task == "none" or not finetune.lora.rank:
        return ()
    r = finetune.lora.rank
    base = {s.name: s for s in layout.specs_of(layout.BLOCK, m)}
    specs = []
    for target in finetune.lora.targets:
        module, split = lora_target(m, target)
        out, inp = layout.full_shape(base[f"{module}.weight"], m, 0)
        a_split, b_split = ("row", "replicated") if split == "row" else ("replicated", split)
        specs.append(layout.ParamSpec(f"{module}.lora_A", a_split, "lora_a", (), (r, inp)))
        specs.append(layout.ParamSpec(f"{module}.lora_B", b_split, "zeros", (), (out, r)))
    return tuple(specs)


def head_params(cfg: Config) -> tuple[layout.ParamSpec, ...] | None:
    """The classification head's parameters (replacing the output layer), or None (sft). The decoder:
    ``score`` [labels, h]; bert (classify and token_classify): ``classifier`` weight [labels, h] and
    bias [labels], replicated over tensor ranks."""
    if cfg.finetune.task not in ("classify", "token_classify"):
        return None
    n, h = len(cfg.finetune.labels), cfg.model.hidden_size
    if cfg.model.family == "bert":
        weight, bias = CLASSIFIER
        return (
            layout.ParamSpec(weight, "replicated", "normal", (weight,), (n, h)),
            layout.ParamSpec(bias, "replicated", "zeros", (bias,), (n,)),
        )
    return (layout.ParamSpec(SCORE, "replicated", "normal", (SCORE,), (n, h)),)


def task_params(cfg: Config) -> layout.TaskParams:
    """What ``cfg.finetune`` adds to the layout table (nothing when ``finetune.task`` is none)."""
    if cfg.finetune.task == "none":
        return layout.LM
    return layout.TaskParams(block=lora_specs(cfg.model, cfg.finetune), head=head_params(cfg))
