"""The parameters fine-tuning adds to the layout table: LoRA adapters on the blocks' projections and
the classification head in place of the output layer. Tables only (no DeepSpeed or megatron-core), so
the export and inspection tools read fine-tuned checkpoints without the training stack.
"""

from __future__ import annotations

from bigtrain.config import Config, FinetuneConfig, ModelConfig
from bigtrain.models import layout

SCORE = "score.weight"  # classification head (LlamaForSequenceClassification's ``score``)

# LoRA target -> (projection module inside a block, its weight's split). Column-parallel bases (split on
# the output dim) get A [r, in] replicated and B [out, r] split like the base's rows; row-parallel bases
# (split on the input dim) get A [r, in] split on its input dim and B [out, r] replicated.
LORA_TARGETS: dict[str, tuple[str, str]] = {
    "qkv": ("attention.qkv", "qkv"),
    "proj": ("attention.proj", "row"),
    "gate_up": ("mlp.gate_up", "gate_up"),
    "down": ("mlp.down", "row"),
}


def lora_specs(m: ModelConfig, finetune: FinetuneConfig | None) -> tuple[layout.ParamSpec, ...]:
    """ParamSpecs of one block's LoRA adapters (``finetune``: a FinetuneConfig; none when rank is 0)."""
    if finetune is None or finetune.task == "none" or not finetune.lora.rank:
        return ()
    r = finetune.lora.rank
    base = {s.name: s for s in layout.LAYER_PARAMS[layout.BLOCK]}
    specs = []
    for target in finetune.lora.targets:
        module, split = LORA_TARGETS[target]
        out, inp = layout.full_shape(base[f"{module}.weight"], m, 0)
        a_split, b_split = ("row", "replicated") if split == "row" else ("replicated", split)
        specs.append(layout.ParamSpec(f"{module}.lora_A", a_split, "lora_a", (), (r, inp)))
        specs.append(layout.ParamSpec(f"{module}.lora_B", b_split, "zeros", (), (out, r)))
    return tuple(specs)


def head_params(cfg: Config) -> tuple[layout.ParamSpec, ...] | None:
    """The classification head's parameter (replacing the output layer), or None (sft)."""
    if cfg.finetune.task != "classify":
        return None
    shape = (len(cfg.finetune.labels), cfg.model.hidden_size)
    return (layout.ParamSpec(SCORE, "replicated", "normal", (SCORE,), shape),)


def task_params(cfg: Config) -> layout.TaskParams:
    """What ``cfg.finetune`` adds to the layout table (nothing when ``finetune.task`` is none)."""
    if cfg.finetune.task == "none":
        return layout.LM
    return layout.TaskParams(block=lora_specs(cfg.model, cfg.finetune), head=head_params(cfg))
