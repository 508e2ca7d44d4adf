"""Describe a bigtrain checkpoint without loading its tensors: config, layout, step, consumed samples
and tokens, shard files, and every parameter's full and per-rank shapes (from the layout table).

    python tools/inspect_checkpoint.py RUN_DIR/checkpoints [--tag TAG] [--json] [--no-tensors]

Accepts a checkpoints directory (``latest`` is used), a step directory, or a run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bigtrain.checkpoint import WeightReader, list_tags
from bigtrain.config import config_from_dict
from bigtrain.finetune.params import task_params
from bigtrain.models import layout

OWN = ("weights", "rng", "tokenizer", "bigtrain.json")  # the rest is DeepSpeed's (exact resume)


def describe(path: str | Path) -> dict:
    """Everything printed, as one JSON-able dict."""
    from safetensors import safe_open

    reader = WeightReader(path)
    meta = reader.meta
    saved = meta["config"]
    cfg = config_from_dict(saved)
    m = cfg.model
    derived = saved.get("derived", {})
    tensor, pipeline = meta["layout"]["tensor"], meta["layout"]["pipeline"]
    padded = derived.get("padded_vocab_size") or 0
    table = {lp.key: lp for lp in layout.iter_layer_params(m, task=task_params(cfg))}

    files, tensors = [], []
    for (tp, pp), f in sorted(reader.files.items()):
        with safe_open(str(f), "pt") as sf:
            keys = list(sf.keys())
            files.append({"file": f.name, "tensors": len(keys), "bytes": f.stat().st_size})
            if tp != 0:
                continue
            for key in keys:
                if reader.key_to_pp.get(key) != pp:
                    continue  # a tied copy on a later stage: listed once
                local = list(sf.get_slice(key).get_shape())
                lp = table.get(key)
                split = lp.spec.split if lp else "?"
                full = list(local)
                if split in ("vocab", "col", "qkv", "gate_up"):
                    full[0] *= tensor
                elif split == "row":
                    full[1] *= tensor
                expected = list(layout.full_shape(lp.spec, m, padded)) if lp and padded else None
                tensors.append(
                    {
                        "key": key,
                        "hf": list(layout.hf_names(lp, m)) if lp else [],
                        "split": split,
                        "stage": pp,
                        "full_shape": full,
                        "rank_shape": local,
                        "dtype": sf.get_slice(key).get_dtype(),
                        **({"table_shape_differs": expected} if expected and expected != full else {}),
                    }
                )
    order = {key: i for i, key in enumerate(table)}
    tensors.sort(key=lambda t: order.get(t["key"], len(order)))
    consumed = meta.get("consumed_samples", 0)
    ckpt_root = reader.dir.parent
    return {
        "path": str(reader.dir),
        "tags": list_tags(ckpt_root),
        "step": meta.get("step"),
        "consumed_samples": consumed,
        "consumed_tokens": consumed * m.seq_length,
        "layout": {
            "tensor": tensor,
            "pipeline": pipeline,
            "data": derived.get("data_parallel_size"),
            "world_size": derived.get("world_size"),
            "zero_stage": cfg.zero.stage,
            "precision": cfg.precision,
            "partition_method": cfg.parallel.partition_method,
        },
        "model": {
            "family": m.family,
            **layout.hf_config_values(m),
            "head_dim": m.head_dim,
            "padded_vocab_size": padded,
            "parameters": sum(math.prod(t["full_shape"]) for t in tensors),
        },
        "other_files": sorted(p.name for p in reader.dir.iterdir() if p.name not in OWN),
        "source": meta.get("source", {}).get("hf"),
        "files": files,
        "tensors": tensors,
        "config": saved,
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _model_line(mod: dict) -> str:
    """The architecture in one line (the family's HF config fields: ``layout.hf_config_values``)."""
    start = (
        f"{mod['num_hidden_layers']} layers, hidden {mod['hidden_size']}, heads {mod['num_attention_heads']}"
    )
    sizes = (
        f"ffn {mod['intermediate_size']}, vocab {mod['vocab_size']} (padded {mod['padded_vocab_size']}), "
        f"seq {mod['max_position_embeddings']}"
    )
    if mod.get("family") == "bert":
        return (
            f"bert encoder, {start} (dim {mod['head_dim']}), {sizes}, token types {mod['type_vocab_size']}, "
            f"eps {mod['layer_norm_eps']}, tied={mod['tie_word_embeddings']}"
        )
    return (
        f"{start} (kv {mod['num_key_value_heads']}, dim {mod['head_dim']}), {sizes}, rope theta "
        f"{mod['rope_theta']}, eps {mod['rms_norm_eps']}, tied={mod['tie_word_embeddings']}"
    )


def render(info: dict, tensors: bool = True) -> str:
    lay, mod = info["layout"], info["model"]
    lines = [
        f"checkpoint  {info['path']}",
        f"tags        {', '.join(info['tags']) or '-'}",
        f"step        {info['step']}",
        f"consumed    {info['consumed_samples']:,} samples = {info['consumed_tokens']:,} tokens",
        f"layout      tensor={lay['tensor']} pipeline={lay['pipeline']} data={lay['data']} "
        f"(world {lay['world_size']}), ZeRO-{lay['zero_stage']}, {lay['precision']}, "
        f"partition={lay['partition_method']}",
        f"model       {_model_line(mod)}",
        f"parameters  {mod['parameters']:,} (padded vocab included)",
    ]
    lines.append(f"deepspeed   {', '.join(info['other_files']) or 'none (weights-only checkpoint)'}")
    if info["source"]:
        lines.append(f"imported    from {info['source']}")
    lines.append("weight files")
    lines += _table([[f["file"], f"{f['tensors']} tensors", f"{f['bytes']:,} bytes"] for f in info["files"]])
    if tensors:
        lines.append("tensors (full shape = merged over tensor ranks; rank shape = one rank's slice)")
        rows = [["key", "split", "stage", "full", "rank", "dtype"]]
        for t in info["tensors"]:
            shape = "x".join(map(str, t["full_shape"]))
            flag = (
                "  (table expects {})".format(t["table_shape_differs"]) if "table_shape_differs" in t else ""
            )
            rank = "x".join(map(str, t["rank_shape"]))
            rows.append([t["key"], t["split"], str(t["stage"]), shape + flag, rank, t["dtype"]])
        lines += _table(rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="RUN_DIR/checkpoints, a step directory, or RUN_DIR")
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-tensors", action="store_true", help="leave out the per-tensor table")
    parser.add_argument("--no-config", action="store_true", help="leave out the saved config")
    args = parser.parse_args(argv)
    path = Path(args.checkpoint) / args.tag if args.tag else Path(args.checkpoint)
    try:
        info = describe(path)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"inspect_checkpoint: {e}", file=sys.stderr)
        sys.exit(1)
    if args.json:
        print(json.dumps(info))  # one line (libraries may log to stdout before it)
        return
    print(render(info, tensors=not args.no_tensors))
    if not args.no_config:
        import yaml

        print("config (as saved)\n" + yaml.safe_dump(info["config"], sort_keys=False).rstrip())


if __name__ == "__main__":
    main()
