"""Choose a parallel layout: per-GPU memory and predicted throughput of every valid layout.

    python tools/plan.py --config configs/llama-7b.yaml --gpus 8 --gpu-memory-gib 80
    python tools/plan.py --config configs/llama-13b.yaml --gpus 16 --nodes 2 --gpu-memory-gib 80 --top 5 --json plan.json
    python tools/plan.py --config configs/llama-1.3b.yaml --gpus 8 --gpu-memory-gib 80 --only tensor=1 zero=1
    python tools/plan.py --config configs/llama-7b.yaml --gpus 8 --gpu-memory-gib 80 --only offload=true --explain
    python tools/plan.py --config configs/bert-large.yaml --gpus 8 --gpu-memory-gib 80
    python tools/plan.py --config configs/llama-8b-128k.yaml --gpus 64 --nodes 8 --gpu-memory-gib 80

Layouts: tensor (with or without sequence parallelism) × context × pipeline × data parallel sizes, ZeRO
stage (and optimizer offload), micro-batch size and activation checkpointing, as bigtrain's config
validation accepts them (the global batch size is kept). Context parallelism (DeepSpeed-Ulysses) is
offered where the model allows it (llama, no pipeline, key/value heads per tensor rank divisible by it);
when the choice uses it, the choice line says why: nothing fits without it, or how much slower the best
layout without it is predicted to be. Memory and throughput come from bigtrain.planner; see its docstring for what is counted (the
decoder families and the bert encoder: model.family).
Prints the ranking and the settings to use (``--set`` overrides for bigtrain.pretrain); ``--explain [RANK]``
prints one layout's seconds per step by term (compute, TP comm, bubble, exposed DP comm, ZeRO-3
overhead, offload host-link copies, offload CPU Adam) and its collective payload per rank.
Optimizer offload: when a layout fits without it, an offload layout ranks after every fitting
no-offload layout unless predicted faster than the best of them by more than ``--offload-margin``
(default 10 %; its host-link and CPU-Adam terms are optimistic); such rows are marked ``*``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bigtrain import flops, planner
from bigtrain.config import ConfigError, load_config, padded_vocab_size

REPO = Path(__file__).resolve().parent.parent


def overrides_for(layout: planner.Layout) -> list[str]:
    return [
        f"parallel.tensor={layout.tensor}",
        f"parallel.pipeline={layout.pipeline}",
        f"zero.stage={layout.zero}",
        f"zero.offload_optimizer={str(layout.offload).lower()}",
        f"train.micro_batch_size={layout.micro_batch}",
        f"activation_checkpointing={layout.checkpointing}",
        f"parallel.sequence_parallel={str(layout.sequence_parallel).lower()}",
        f"parallel.context={layout.context}",
        f"parallel.expert={layout.expert}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p.add_argument("--gpu-memory-gib", type=float, required=True, help="memory per GPU")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    p.add_argument(
        "--intra-node-gbps",
        type=float,
        default=planner.Hardware.intra_node_gbps,
        help="all-reduce bus bandwidth per GPU within a node, GB/s (default: NVLink H100)",
    )
    p.add_argument(
        "--inter-node-gbps",
        type=float,
        default=planner.Hardware.inter_node_gbps,
        help="bus bandwidth per GPU across nodes, GB/s (default: 400 Gb/s InfiniBand)",
    )
    p.add_argument(
        "--host-link-gbps", type=float, default=25.0, help="GPU<->host GB/s per GPU (optimizer offload)"
    )
    p.add_argument("--host-cores-per-gpu", type=int, default=12, help="host cores running CPU Adam per GPU")
    p.add_argument(
        "--offload-margin",
        type=float,
        default=planner.OFFLOAD_MARGIN,
        help="an offload layout ranks after every fitting no-offload one unless predicted faster than the "
        "best of them by more than this fraction (default %(default)s; planner.rank)",
    )
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument(
        "--explain",
        type=int,
        nargs="?",
        const=1,
        default=None,
        metavar="RANK",
        help="print seconds per step by term for the layout at this rank of the printed list (default 1)",
    )
    p.add_argument(
        "--only", nargs="+", default=[], metavar="FIELD=VALUE", help="keep layouts with these fields"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if bad := [item for item in args.only if "=" not in item]:
        print(f"plan: --only {bad[0]}: expected FIELD=VALUE", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.set)
        hw = planner.Hardware(
            peak_tflops=args.peak_tflops,
            intra_node_gbps=args.intra_node_gbps,
            inter_node_gbps=args.inter_node_gbps,
            host_link_gbps=args.host_link_gbps,
            host_cores_per_gpu=args.host_cores_per_gpu,
        )
        only = dict(item.split("=", 1) for item in args.only)
        ranked = planner.plan(cfg, args.gpus, args.gpu_memory_gib, args.nodes, hw, args.offload_margin, only)
    except (ConfigError, ValueError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    if not ranked:
        why = f" with --only {' '.join(args.only)}" if args.only else ""
        print(f"plan: no valid layout{why} (check --gpus against the model's heads, layers and global batch)")
        return 1
    m = cfg.model
    params = flops.num_parameters(m, padded_vocab_size(m, 1))
    active = flops.active_parameters(m, padded_vocab_size(m, 1))
    moe = (
        f" ({active / 1e6:,.0f}M active, {m.moe.num_experts} experts top-{m.moe.top_k})"
        if m.moe.num_experts
        else ""
    )
    print(
        f"{args.config}: {m.family}, {params / 1e6:,.0f}M parameters{moe}, {m.num_layers} layers, h={m.hidden_size}, seq {m.seq_length}, {cfg.precision}, "
        f"global batch {cfg.train.global_batch_size}; {args.gpus} GPUs x {args.gpu_memory_gib:g} GiB"
        f" on {args.nodes} node(s); {len(ranked)} valid layouts, {sum(c.fits for c in ranked)} fit"
    )
    print(f"{'#':>3} {'layout':<54} {'GiB/GPU':>8} {'fits':>5} {'tok/s/GPU':>10} {'MFU':>5}")
    for i, c in enumerate(ranked[: args.top], 1):
        print(
            f"{i:>3} {c.layout.describe():<54} {c.memory.total / planner.GIB:>8.1f} {'yes' if c.fits else 'no':>5} "
            f"{c.tokens_per_sec_per_gpu:>10,.0f} {c.mfu:>5.0%}{' *' if c.demoted else ''}"
        )
    if any(c.demoted for c in ranked[: args.top]):
        print(
            f"  * offload demoted: not predicted more than {args.offload_margin:.0%} faster than the best "
            "fitting no-offload layout (--offload-margin; the offload terms are optimistic)"
        )
    if args.explain is not None:
        if not 1 <= args.explain <= len(ranked):
            print(f"plan: --explain {args.explain}: the list has ranks 1-{len(ranked)}", file=sys.stderr)
            return 2
        print("\n" + planner.breakdown(ranked[args.explain - 1], cfg))
    best = ranked[0]
    print(f"\nchoice: {best.why}")
    if best.fits:
        print("settings: --set " + " ".join(overrides_for(best.layout)))
    if args.json:
        Path(args.json).write_text(json.dumps([c.as_dict() for c in ranked], indent=2))
    return 0 if best.fits else 1


if __name__ == "__main__":
    sys.exit(main())
