"""Export a bigtrain checkpoint (any tensor x pipeline x data layout, any ZeRO stage) to a Hugging Face
``LlamaForCausalLM`` directory (or the family it was imported from, ``model.hf_model_type``: Mistral, Qwen2,
Qwen3, Phi-3, Gemma 2/3, and with ``model.moe`` Mixtral or Qwen2-MoE, every expert whatever the expert-parallel
size it was trained at):
config.json, sharded safetensors + index, generation_config.json and
the tokenizer files. A ``model.family: bert`` checkpoint exports as ``BertForPreTraining`` (loads with
``AutoModelForPreTraining``, ``AutoModelForMaskedLM`` and ``AutoModel``; no generation_config.json).

    python tools/convert_to_hf.py --checkpoint RUN_DIR/checkpoints [--tag TAG] --output HF_DIR [--dtype bf16]

Reads the fp32 master weights bigtrain saves per tensor/pipeline rank (``weights/tpTT_ppPP.safetensors``,
written whatever the ZeRO stage, so data parallelism and ZeRO need no merging), merges tensor-parallel
shards through the shared layout table (``bigtrain.models.layout``, also used by
``tools/convert_from_hf.py``), strips vocab padding and writes one tensor for tied embeddings. Streams:
one merged parameter plus one output shard in memory at a time. Every shard file is checked before
anything is written; the output goes to a temporary directory renamed at the end, so a failed export
leaves nothing behind (and an existing export at HF_DIR is only replaced by a complete one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from bigtrain.checkpoint import WeightReader
from bigtrain.config import PRECISION_DTYPES, Config, ConfigError, config_from_dict, torch_dtype
from bigtrain.finetune.export import hf_config_overrides, hf_tensor_groups, write_peft_adapter
from bigtrain.finetune.params import task_params
from bigtrain.models import layout

SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")
# BertConfig's training-time dropout: bigtrain's bert computes none; an import's own values are written
# back (HF fine-tuning from the export uses them), else BertConfig's defaults apply
BERT_DROPOUT = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message names the cause."""


def checkpoint_config(reader: WeightReader) -> Config:
    """The saved config, resolved at the layout it was saved with (so the vocab padding matches)."""
    lay = reader.meta["layout"]
    world = reader.meta["config"].get("derived", {}).get("world_size") or lay["tensor"] * lay["pipeline"]
    return config_from_dict(reader.meta["config"]).resolve(world)


def check_complete(reader: WeightReader, cfg: Config) -> None:
    """Every tensor x pipeline shard file exists and every parameter of the table is in one of them;
    with tied embeddings and several stages, the first and last stage's copies agree."""
    from safetensors import safe_open

    lay = reader.meta["layout"]
    expected = {(t, p) for t in range(lay["tensor"]) for p in range(lay["pipeline"])}
    missing = sorted(expected - set(reader.files))
    if missing:
        names = ", ".join(f"tp{t:02d}_pp{p:02d}.safetensors" for t, p in missing)
        raise ExportError(f"{reader.dir / 'weights'}: missing shard file(s) {names} (incomplete checkpoint)")
    params = layout.iter_layer_params(cfg.model, task=task_params(cfg))
    absent = [lp.key for lp in params if lp.key not in reader.key_to_pp]
    if absent:
        raise ExportError(
            f"{reader.dir}: no tensor {', '.join(absent[:5])} in any shard (model differs from config?)"
        )
    for t in range(lay["tensor"]):
        first_stage: dict[str, int] = {}  # key -> first stage holding it; a later copy must be equal
        for p in range(lay["pipeline"]):
            with safe_open(str(reader.files[(t, p)]), "pt") as f:
                for key in f.keys():
                    if key not in first_stage:
                        first_stage[key] = p
                    elif not torch.equal(_tensor(reader, t, first_stage[key], key), f.get_tensor(key)):
                        raise ExportError(
                            f"{reader.dir}: {key} differs between pipeline stages (tied copies out of sync)"
                        )


def _tensor(reader: WeightReader, tp: int, pp: int, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(reader.files[(tp, pp)]), "pt") as f:
        return f.get_tensor(key)


def has_hf_tokenizer(tokenizer_dir: Path | None) -> bool:
    return tokenizer_dir is not None and any((tokenizer_dir / f).is_file() for f in HF_TOKENIZER_FILES)


def special_ids(meta: dict, tokenizer_dir: Path | None) -> dict[str, int | None]:
    """bos/eos/pad ids: the exported tokenizer's (its HF files as ``AutoTokenizer`` loads them, checked against
    its tokenizer.model), else those of the HF model it was imported from, else unset. An id the tokenizer
    does not define (a Llama-2 model has no pad) is left unset, never written as -1."""
    model = None if tokenizer_dir is None else tokenizer_dir / "tokenizer.model"
    if not has_hf_tokenizer(tokenizer_dir):
        if model is not None and model.is_file():  # a bare SentencePiece model
            from tokenizer import Tokenizer

            sp = Tokenizer.load(model)
            return {f"{n}_token_id": i if i >= 0 else None for n, i in (("bos", sp.bos_id), ("eos", sp.eos_id),
                                                                        ("pad", sp.pad_id))}  # fmt: skip
        source = meta.get("source", {}).get("hf_config", {})
        return {k: source.get(k) for k in SPECIAL}
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:
        raise ExportError(f"{tokenizer_dir}: transformers cannot load the tokenizer files ({e})") from None
    if model.is_file():
        from tokenizer import Tokenizer

        sp = Tokenizer.load(model)
        for name in ("bos", "eos", "unk", "pad"):
            want, got = getattr(sp, f"{name}_id"), getattr(hf, f"{name}_token_id")
            if want is not None and want >= 0 and got is not None and got != want:
                raise ExportError(
                    f"{tokenizer_dir}: the HF tokenizer files make {name} id {got} but {model} has {want}; "
                    "training and the export would disagree"
                )
    return {k: getattr(hf, k) for k in SPECIAL}


def stop_ids(
    tokenizer_dir: Path | None, eos: int | None, template: str | None = None
) -> int | list[int] | None:
    """generation_config's eos_token_id: EOS plus the token the chat template ends assistant replies with
    (``<|im_end|>``, ``<|eot_id|>``, ...) when it is another one, so generation stops where SFT taught it.
    ``template``: the one the checkpoint was trained with (default: the directory's)."""
    ids = [] if eos is None else [eos]
    if has_hf_tokenizer(tokenizer_dir):
        from bigtrain.finetune.data import ChatTemplate, DataError

        try:
            chat = ChatTemplate(tokenizer_dir, template)
            ids += [i for i in chat.end_of_turn_ids() if i not in ids]
        except DataError as e:
            if "no chat template" not in str(e):
                print(f"convert_to_hf: warning: {e}; generation stops on EOS only", file=sys.stderr)
    return ids[0] if len(ids) == 1 else ids or None


def trained_template(reader: WeightReader, tokenizer_dir: Path | None) -> str | None:
    """The chat template an SFT checkpoint was trained with (``chat_template`` in its bigtrain.json), which
    the export writes; when the tokenizer directory now holds another one, a one-line warning names both.
    None for checkpoints that record none (pretraining, classification, imports, older runs)."""
    recorded = reader.meta.get("chat_template")
    if not isinstance(recorded, dict) or not recorded.get("text") or tokenizer_dir is None:
        return None
    from bigtrain.finetune.data import DataError, current_template, template_file

    try:
        now = current_template(tokenizer_dir)
    except DataError:
        now = None
    if now != recorded["text"]:
        import hashlib

        current = f"sha256 {hashlib.sha256(now.encode('utf-8')).hexdigest()[:12]}" if now else "none"
        print(
            f"convert_to_hf: warning: the chat template in {template_file(tokenizer_dir)} ({current}) differs "
            f"from the one {reader.dir} was trained with (sha256 {str(recorded.get('sha256'))[:12]}, from "
            f"{recorded.get('source')}); the export uses the trained one",
            file=sys.stderr,
        )
    return recorded["text"]


def write_template(export_dir: Path, template: str) -> None:
    """Put ``template`` where transformers reads it in the export: chat_template.jinja when the copied
    files have one, else tokenizer_config.json's ``chat_template`` (nothing else of it changes)."""
    from bigtrain.finetune.data import CHAT_TEMPLATE_FILE

    jinja, config_file = export_dir / CHAT_TEMPLATE_FILE, export_dir / "tokenizer_config.json"
    if jinja.is_file():
        jinja.write_text(template, encoding="utf-8")
        return
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config["chat_template"] = template
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def hf_config(cfg: Config, dtype: str, meta: dict | None = None, tokenizer_dir: Path | None = None) -> dict:
    """config.json of the export: the family the model came from (``model.hf_model_type``, one of
    ``layout.HF_ARCHITECTURES``) with its own fields (``layout.hf_variant_values``), the shared ones from the config
    table, true (unpadded) vocab. Rotary settings are written in both the ``rope_parameters``
    (transformers 5) and ``rope_theta``/``rope_scaling`` (transformers 4) forms."""
    import transformers

    m = cfg.model
    source = (meta or {}).get("source", {}).get("hf_config", {})
    dropout = {k: source[k] for k in BERT_DROPOUT if k in source} if m.family == "bert" else {}
    # an output switch (HF returns router logits and adds the aux loss): an import's own value comes back
    router = {k: source[k] for k in ("output_router_logits",) if k in source} if m.moe.num_experts else {}
    return {
        **dropout,
        **layout.hf_variant_values(m),
        **router,
        **layout.hf_config_values(m),
        "use_cache": True,
        "torch_dtype": PRECISION_DTYPES[dtype],
        "dtype": PRECISION_DTYPES[dtype],
        "transformers_version": transformers.__version__,
        **special_ids(meta or {}, tokenizer_dir),
        **hf_config_overrides(cfg),  # LlamaForSequenceClassification and its labels for classifiers
    }


def _prepare_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ExportError(f"{out} exists and is not a Hugging Face export; choose another --output")


def export(
    checkpoint: str | Path,
    output: str | Path,
    dtype: str = "fp32",
    max_shard_bytes: int = 2 << 30,
    progress: bool | None = None,
    peft_adapter: str | Path | None = None,
) -> Path:
    """``peft_adapter``: for a LoRA checkpoint, write the base weights (not merged) to ``output`` and the
    adapters as a PEFT directory there; otherwise LoRA is merged into the exported weights."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    reader = WeightReader(checkpoint)
    cfg = checkpoint_config(reader)
    if cfg.model.moe.num_experts and cfg.model.hf_model_type not in layout.MOE_HF_TYPES:
        raise ExportError(
            f"{reader.dir}: model.moe.num_experts {cfg.model.moe.num_experts} with model.hf_model_type "
            f"{cfg.model.hf_model_type!r}, whose HF class has no experts; set model.hf_model_type "
            f"{'|'.join(layout.MOE_HF_TYPES)} (Mixtral: no shared expert; Qwen2-MoE: a gated shared expert)"
        )
    check_complete(reader, cfg)
    if cfg.model.moe.num_experts and cfg.model.moe.capacity_factor is not None:
        print(
            f"convert_to_hf: warning: model.moe.capacity_factor {cfg.model.moe.capacity_factor}: HF's "
            f"{layout.HF_ARCHITECTURES[cfg.model.hf_model_type]} routes every token (dropless); its outputs "
            "differ from bigtrain's wherever bigtrain drops tokens past an expert's capacity",
            file=sys.stderr,
        )
    out = Path(output).resolve()
    _prepare_output(out)
    tokenizer_dir = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        print(
            f"convert_to_hf: warning: data.tokenizer {tokenizer_dir} not found; no tokenizer files",
            file=sys.stderr,
        )
        tokenizer_dir = None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written: list[tuple[Path, list[str]]] = []  # (temporary shard file, tensor names)
        current: dict[str, torch.Tensor] = {}
        current_bytes = total_bytes = 0

        def flush() -> None:
            path = tmp / f"shard-{len(written):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            written.append((path, list(current)))
            current.clear()

        groups = hf_tensor_groups(reader, cfg, merge_lora=peft_adapter is None)
        total = sum(
            1
            for lp in layout.iter_layer_params(cfg.model, task=task_params(cfg))
            if layout.hf_names(lp, cfg.model)
        )
        bar = tqdm(
            groups,
            total=total,
            desc="export",
            unit="group",
            disable=None if progress is None else not progress,
        )
        for key, tensors in bar:
            bar.set_postfix_str(key)
            for name, tensor in tensors.items():
                t = (
                    tensor.to(torch_dtype(dtype)).contiguous().clone()
                )  # own storage (no views shared in a file)
                nbytes = t.numel() * t.element_size()
                if current and current_bytes + nbytes > max_shard_bytes:
                    flush()
                    current_bytes = 0
                current[name] = t
                current_bytes += nbytes
                total_bytes += nbytes
        flush()
        weight_map = {}
        for i, (path, names) in enumerate(written):
            final = path.rename(tmp / f"model-{i + 1:05d}-of-{len(written):05d}.safetensors")
            weight_map.update({n: final.name for n in names})
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = hf_config(cfg, dtype, reader.meta, tokenizer_dir)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        trained = trained_template(reader, tokenizer_dir)
        if cfg.model.family != "bert":  # an encoder does not generate
            generation = {k: config[k] for k in SPECIAL if config[k] is not None}
            if (eos := stop_ids(tokenizer_dir, config["eos_token_id"], trained)) is not None:
                generation["eos_token_id"] = eos
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer_dir is not None:
            from tokenizer import TokenizerError, export_files

            try:  # the tokenizer files byte for byte (SentencePiece or Hugging Face backed), checked to load
                export_files(tokenizer_dir, tmp)
            except (OSError, TokenizerError) as e:
                raise ExportError(f"data.tokenizer {tokenizer_dir}: {e}") from None
            if trained is not None:
                write_template(tmp, trained)
        _replace(tmp, out)
        if peft_adapter is not None:
            write_peft_adapter(reader, cfg, peft_adapter, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an old export there is removed only after that."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="RUN_DIR/checkpoints (uses 'latest') or a step dir"
    )
    parser.add_argument("--tag", help="checkpoint tag, e.g. step_00000100 (default: latest)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--dtype", choices=sorted(PRECISION_DTYPES), default="fp32")
    parser.add_argument("--max-shard-size-mb", type=float, default=2048, help="per safetensors file")
    parser.add_argument(
        "--peft-adapter",
        metavar="DIR",
        help="LoRA checkpoints: write the adapters as a PEFT directory here and the unmerged base to --output",
    )
    args = parser.parse_args(argv)
    source = Path(args.checkpoint) / args.tag if args.tag else Path(args.checkpoint)
    try:
        out = export(
            source,
            args.output,
            args.dtype,
            int(args.max_shard_size_mb * 2**20),
            peft_adapter=args.peft_adapter,
        )
    except (ExportError, ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
