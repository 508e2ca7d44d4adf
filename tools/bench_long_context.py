"""Long-context pretraining on 2 ranks: step time and per-rank memory of TP2, TP2+SP and CP2 by sequence.

    python tools/bench_long_context.py --seq 1024 2048 4096 8192 --json long.json

Each (layout, sequence length) is one fresh ``torchrun --nproc_per_node=2 -m bigtrain.pretrain`` run
(gloo, one thread per rank, mock data, fp32, micro-batch 1, no checkpoints), on a small llama
(``--config``, default configs/tiny.yaml, reshaped by ``MODEL``: 4 layers, hidden 256, 8 heads, 4 KV
heads; ``--set`` adds overrides). Layouts: ``tp2`` (parallel.tensor=2), ``tp2-sp`` (and
parallel.sequence_parallel=true), ``cp2`` (parallel.context=2). All three are data-parallel size 1, so
they train on the same batches from the same initial weights: their step-1 losses are compared.

* step time: rank 0's ``step_seconds`` (metrics.jsonl), median of the ``--steps`` steps after
  ``--warmup`` steps;
* memory: rank 0's peak RSS (``mem_gib``: ``ru_maxrss`` on CPU; the layouts are symmetric, both ranks
  hold the same shapes), not saved-tensor accounting (that needs hooks inside the process). What grows
  with the sequence is activation memory (the model, optimizer and libraries do not change; SDPA keeps
  no seq x seq matrix), so the activation figure is the growth of peak RSS over the same layout's run
  at the shortest length (``act Δ``), and ``TP2 ÷ this`` compares that growth between layouts. It
  includes the logits, the loss and transient buffers, not only the tensors saved for backward.

Runs go layout-interleaved per sequence length (tp2, tp2-sp, cp2, then the next length), so drift in
the machine's load hits the layouts alike; the 1-minute load average is recorded before and after.
Lengths run in increasing order; once ``--budget-s`` would be exceeded (the next length is predicted
to take twice the last one's runs), the remaining lengths are dropped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

MODEL = [
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.num_attention_heads=8",
    "model.num_kv_heads=4",
    "model.ffn_hidden_size=512",
]
LAYOUTS = {
    "tp2": ["parallel.tensor=2"],
    "tp2-sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "cp2": ["parallel.context=2"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per run")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (median)")
    p.add_argument("--budget-s", type=float, default=900, help="start no length predicted to end past this")
    p.add_argument("--work-dir", default="runs/bench_long_context")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides (key=value)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def torchrun_2(module_args: list[str], run_dir: Path, timeout: float) -> tuple[Any, list[dict[str, Any]]]:
    """``torchrun --nproc_per_node=2 -m MODULE_ARGS`` on CPU (gloo, one thread per rank, this checkout
    first on the path): the finished process and the step records of ``run_dir/metrics.jsonl``."""
    from bigtrain.distributed import _free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [*cmd, "-m", *module_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    metrics = run_dir / "metrics.jsonl"
    records = []
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return proc, [r for r in records if "step_seconds" in r]


def run_one(args: argparse.Namespace, layout: str, seq: int) -> dict[str, Any]:
    """One torchrun of bigtrain.pretrain; returns its step-1 loss, step times and rank 0's peak RSS.
    Raises SystemExit with the end of the log if the run fails or logs too few steps."""
    run_dir = Path(args.work_dir).resolve() / f"{layout}-{seq}"
    sets = [
        *MODEL,
        f"model.seq_length={seq}",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        f"train.steps={args.warmup + args.steps}",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "data.mock=true",
        f"train.run_dir={run_dir}",
        *LAYOUTS[layout],
        *args.set,
    ]
    t0 = time.perf_counter()
    proc, records = torchrun_2(
        ["bigtrain.pretrain", "--config", str(Path(args.config).resolve()), "--set", *sets],
        run_dir,
        args.timeout,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or len(records) < args.warmup + args.steps:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise SystemExit(f"bench_long_context: {layout} seq {seq} failed (exit {proc.returncode}):\n{tail}")
    timed = [r["step_seconds"] for r in records[args.warmup : args.warmup + args.steps]]
    return {
        "loss_step1": records[0]["loss"],
        "step_seconds": timed,
        "median_step_s": statistics.median(timed),
        "peak_rss_gib": max(r["mem_gib"] for r in records),
        "run_seconds": wall,
    }


def _now() -> float:
    """Wall-clock seconds for the budget (a function, so tests can stand in a clock)."""
    return time.perf_counter()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All runs (see the module docstring); the report with per-run figures, activation estimates and
    ratios against TP2 at the same length."""
    import platform

    import deepspeed
    import torch

    load_before = os.getloadavg()[0]
    started = _now()
    results: dict[str, dict[str, Any]] = {}
    dropped: list[int] = []
    last_seconds = 0.0
    for seq in sorted(args.seq):
        if results and _now() - started + 2 * last_seconds > args.budget_s:
            dropped.append(seq)
            continue
        t0 = _now()
        row = {lay: run_one(args, lay, seq) for lay in args.layouts}
        last_seconds = _now() - t0
        results[str(seq)] = row
    first = next(iter(results.values()))
    for row in results.values():
        ref = row.get("tp2")
        for lay, r in row.items():
            r["activation_delta_gib"] = r["peak_rss_gib"] - first[lay]["peak_rss_gib"]
        if ref is None:
            continue
        for r in row.values():
            r["step_time_vs_tp2"] = r["median_step_s"] / ref["median_step_s"]
            r["loss_rel_diff_vs_tp2"] = abs(r["loss_step1"] - ref["loss_step1"]) / abs(ref["loss_step1"])
            if r["activation_delta_gib"] > 0 and ref["activation_delta_gib"] > 0:
                r["activation_tp2_over_this"] = ref["activation_delta_gib"] / r["activation_delta_gib"]
    report = {
        "model": MODEL,
        "config": args.config,
        "extra_sets": args.set,
        "warmup": args.warmup,
        "steps": args.steps,
        "results": results,
        "dropped_seq": dropped,
        "total_seconds": _now() - started,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def format_table(report: dict[str, Any]) -> str:
    """Markdown table, one line per (length, layout)."""
    lines = [
        "| seq | layout | step s (median) | ÷ TP2 | peak RSS GiB | act Δ GiB | TP2 ÷ this | step-1 loss Δ |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for seq, row in report["results"].items():
        for lay, r in row.items():
            act = f"{r['activation_delta_gib']:.3f}"
            ratio = f"{r['activation_tp2_over_this']:.2f}" if "activation_tp2_over_this" in r else "—"
            vs = f"{r['step_time_vs_tp2']:.2f}" if "step_time_vs_tp2" in r else "—"
            diff = f"{r['loss_rel_diff_vs_tp2']:.1e}" if "loss_rel_diff_vs_tp2" in r else "—"
            lines.append(
                f"| {seq} | {lay} | {r['median_step_s']:.3f} | {vs} | {r['peak_rss_gib']:.3f} | {act} | "
                f"{ratio} | {diff} |"
            )
    if report["dropped_seq"]:
        lines.append(f"\ndropped (over --budget-s): {report['dropped_seq']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))


if __name__ == "__main__":
    main()
