"""Export a bigtrain checkpoint (any tensor x pipeline x data layout, any ZeRO stage) to a Hugging Face
``LlamaForCausalLM`` directory: config.json, sharded safetensors + index, generation_config.json and
the tokenizer files.

    python tools/convert_to_hf.py --checkpoint RUN_DIR/checkpoints [--tag TAG] --output HF_DIR [--dtype bf16]

Reads the fp32 master weights bigtrain saves per tensor/pipeline rank, merges tensor-parallel shards
through the shared layout table (bigtrain.models.layout), strips vocab padding, and streams: one
merged tensor plus one output shard in memory at a time. The output is written to a temporary
directory and renamed, so a failed export leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigtrain.checkpoint import WeightReader  # noqa: E402
from bigtrain.config import Config, config_from_dict  # noqa: E402
from bigtrain.models import layout  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def checkpoint_config(reader: WeightReader) -> Config:
    lay = reader.meta["layout"]
    return config_from_dict(reader.meta["config"]).resolve(lay["tensor"] * lay["pipeline"])


def special_ids(cfg: Config) -> dict[str, int]:
    if cfg.data.tokenizer and (Path(cfg.data.tokenizer) / "tokenizer.model").is_file():
        from tokenizer import Tokenizer

        tok = Tokenizer.load(cfg.data.tokenizer)
        return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def hf_config(cfg: Config, dtype: str) -> dict:
    """LlamaConfig fields for the true (unpadded) vocab."""
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
        **special_ids(cfg),
    }


def hf_tensors(reader: WeightReader, cfg: Config):
    """(HF name, tensor) pairs, one merged bigtrain tensor at a time."""
    for lp in layout.iter_layer_params(cfg.model):
        yield from layout.to_hf(lp, reader.full(lp), cfg.model).items()


def export(checkpoint: str | Path, output: str | Path, dtype: str = "fp32", max_shard_bytes: int = 2 << 30) -> Path:
    from safetensors.torch import save_file
    from tqdm import tqdm

    reader = WeightReader(checkpoint)
    cfg = checkpoint_config(reader)
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp")
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

        count = sum(len(lp.spec.hf) for lp in layout.iter_layer_params(cfg.model))
        for name, tensor in tqdm(hf_tensors(reader, cfg), total=count, desc="export", disable=None):
            t = tensor.to(DTYPES[dtype]).contiguous()
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
        config = hf_config(cfg, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if cfg.data.tokenizer:
            src = Path(cfg.data.tokenizer)
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoints (uses 'latest') or a step dir")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step_00000100 (default: latest)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--max-shard-size-mb", type=int, default=2048)
    args = parser.parse_args(argv)
    source = Path(args.checkpoint) / args.tag if args.tag else Path(args.checkpoint)
    try:
        out = export(source, args.output, args.dtype, args.max_shard_size_mb << 20)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
