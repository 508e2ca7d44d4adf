"""Hugging Face export of fine-tuned checkpoints (used by tools/convert_to_hf.py): LoRA merged into the
base weights or written as a PEFT adapter directory; classification as the family's
...ForSequenceClassification (bert: BertForSequenceClassification, token classification
BertForTokenClassification).
Imports no DeepSpeed/megatron (the export tool stays light)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bigtrain.config import Config
from bigtrain.finetune.params import SCORE, lora_specs, lora_target, task_params
from bigtrain.models import layout

if TYPE_CHECKING:  # annotation only: the callers open the reader
    from bigtrain.checkpoint import WeightReader


def _lora(
    reader: WeightReader, cfg: Config, index: int, module: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Full (A, B) of a block's projection, or None when it has no adapter."""
    specs = {s.name: s for s in lora_specs(cfg.model, cfg.finetune)}
    if f"{module}.lora_A" not in specs:
        return None
    a = reader.full(layout.LayerParam(index, specs[f"{module}.lora_A"]))
    b = reader.full(layout.LayerParam(index, specs[f"{module}.lora_B"]))
    return a, b


def hf_tensor_groups(
    reader: WeightReader, cfg: Config, merge_lora: bool = True
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(layout key, HF tensors) per base parameter; LoRA deltas scale*B@A merged in when ``merge_lora``
    (otherwise the base weights as they were, for a PEFT adapter on top)."""
    m, ft = cfg.model, cfg.finetune
    scale = ft.lora.alpha / ft.lora.rank if ft.lora.rank else 0.0
    # BertForTokenClassification has no pooler (add_pooling_layer=False): its tensors would load as
    # unexpected keys, so the export leaves them out
    no_pooler = m.family == "bert" and ft.task == "token_classify"
    for lp in layout.iter_layer_params(m, task=task_params(cfg)):
        if lp.spec.name.endswith(("lora_A", "lora_B")):
            continue
        if no_pooler and layout.layer_kind(lp.index, m.num_layers) == layout.FINAL_NORM:
            continue
        full = reader.full(lp)
        if lp.spec.name == SCORE:
            yield lp.key, {"score.weight": full}
            continue
        module = lp.spec.name.removesuffix(".weight")
        lora = _lora(reader, cfg, lp.index, module) if merge_lora and ft.lora.rank else None
        if lora is not None:
            full = full + scale * (lora[1] @ lora[0])  # [out, r] @ [r, in], in bigtrain's full layout
        yield lp.key, layout.to_hf(lp, full, m)


def peft_tensors(reader: WeightReader, cfg: Config) -> dict[str, torch.Tensor]:
    """PEFT's adapter state: a fused projection's A is shared by its parts, B is split like the weight.
    The bert family's classifier (trained with the adapters) rides along as PEFT's ``modules_to_save``."""
    m, ft = cfg.model, cfg.finetune
    base = {s.name: s for s in layout.specs_of(layout.BLOCK, m)}
    out = {}
    for i in range(1, m.num_layers + 1):
        for target in ft.lora.targets:
            module = lora_target(m, target)[0]
            pair = _lora(reader, cfg, i, module)
            if pair is None:  # lora_specs gives every target an adapter: a layout bug, not a user error
                raise RuntimeError(
                    f"finetune.lora.targets lists {target} but block {i} has no {module} adapter"
                )
            a, b = pair
            # HF weight name -> B rows: the HF modules the fused projection is split into (one when the
            # family fuses it too, e.g. Phi-3's qkv_proj), named as the base model's weights
            parts = layout.to_hf(layout.LayerParam(i, base[f"{module}.weight"]), b, m)
            for hf_name, b_part in parts.items():
                prefix = "base_model.model." + hf_name.removesuffix(".weight")
                out[f"{prefix}.lora_A.weight"] = a.contiguous().clone()
                out[f"{prefix}.lora_B.weight"] = b_part.contiguous().clone()
    for spec in _saved_head(cfg):
        head = layout.LayerParam(layout.num_list_layers(m) - 1, spec)
        out[f"base_model.model.{layout.hf_names(head, m)[0]}"] = reader.full(head).contiguous()
    return out


def write_peft_adapter(reader: WeightReader, cfg: Config, out_dir: str | Path, base_dir: str | Path) -> Path:
    """adapter_config.json + adapter_model.safetensors, loadable with
    ``peft.PeftModel.from_pretrained(<the exported base model>, out_dir)``."""
    from safetensors.torch import save_file

    ft = cfg.finetune
    if not ft.lora.rank:
        raise ValueError(
            f"{reader.dir}: not a LoRA checkpoint (finetune.lora.rank is 0); no adapter to export"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(reader, cfg)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": {"classify": "SEQ_CLS", "token_classify": "TOKEN_CLS"}.get(ft.task, "CAUSAL_LM"),
        "base_model_name_or_path": str(Path(base_dir).resolve()),
        "r": ft.lora.rank,
        "lora_alpha": ft.lora.alpha,
        "lora_dropout": ft.lora.dropout,
        "target_modules": _target_modules(cfg, tensors),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": ["classifier"] if _saved_head(cfg) else None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def _saved_head(cfg: Config) -> tuple[layout.ParamSpec, ...]:
    """The head a PEFT adapter carries whole: the bert family's ``classifier`` (PEFT's SEQ_CLS/TOKEN_CLS
    models wrap it as ``modules_to_save`` and load it from the adapter)."""
    head = task_params(cfg).head
    return head if cfg.model.family == "bert" and head is not None else ()


def _target_modules(cfg: Config, tensors: dict[str, torch.Tensor]) -> list[str] | str:
    """PEFT's ``target_modules`` of the adapter tensors (``base_model.model.<module>.lora_A.weight``): the
    decoder's module names (q_proj, ...); bert's names repeat across roles (``dense`` is the attention
    output, the MLP's two projections and the pooler), so a regex of exactly the adapted modules' paths."""
    if cfg.model.family == "bert":
        adapters = [name for name in tensors if ".lora_" in name]  # not the classifier it carries
        paths = {name.removeprefix("base_model.model.").rsplit(".", 2)[0] for name in adapters}
        return "|".join(re.escape(path) for path in sorted(paths))
    return sorted({name.split(".")[-3] for name in tensors})  # "<module>.lora_A.weight"


def hf_config_overrides(cfg: Config) -> dict:
    """config.json fields that depend on the fine-tuning task (a classifier: the family's
    ``...ForSequenceClassification``, bert's token classifier ``BertForTokenClassification``; a language
    model keeps the family's causal-LM class)."""
    ft = cfg.finetune
    if ft.task not in ("classify", "token_classify"):
        return {}
    labels = {
        "num_labels": len(ft.labels),
        "id2label": {str(i): name for i, name in enumerate(ft.labels)},
        "label2id": {name: i for i, name in enumerate(ft.labels)},
    }
    if cfg.model.family == "bert":
        kind = "Token" if ft.task == "token_classify" else "Sequence"
        # no problem_type for tokens: HF's token classifier always takes single-label cross-entropy
        extra = {} if kind == "Token" else {"problem_type": "single_label_classification"}
        return {"architectures": [f"BertFor{kind}Classification"], **labels, **extra}
    causal_lm = layout.HF_ARCHITECTURES[cfg.model.hf_model_type]
    return {
        "architectures": [causal_lm.replace("ForCausalLM", "ForSequenceClassification")],
        **labels,
        "problem_type": "single_label_classification",
    }
