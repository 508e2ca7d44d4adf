"""MoE throughput on this machine: tokens/s of the moe-tiny preset at EP1 and EP2, and the share of the
step spent in the token dispatcher's all-to-alls.

    python tools/bench_moe.py --json moe.json

Each layout is one fresh ``torchrun --nproc_per_node=2 -m tools.bench_moe --worker ...`` run (gloo,
one thread per rank, mock data, fp32, no checkpoints) of ``--config`` (default configs/moe-tiny.yaml;
``--set`` adds overrides): ``ep1`` is data parallel 2 with every expert on both ranks
(parallel.expert=1), ``ep2`` data parallel 2 with the experts split over the two ranks
(parallel.expert=2, tokens dispatched with all-to-all). Same global batch, so tokens/s compare.

* tokens/s: rank 0's ``tokens_per_sec`` (metrics.jsonl; global batch tokens over the step's seconds),
  median of ``--steps`` steps after ``--warmup`` steps;
* all-to-all share: in the benchmark's processes only, ``torch.distributed.all_to_all_single`` (what
  megatron's ``_AllToAll`` calls forward and backward) is wrapped with a timer; per step the seconds
  spent in it over the step's seconds, rank 0, median over the timed steps. gloo's calls block, so this
  includes waiting for the other rank (load imbalance between the ranks' experts shows up here).

Layouts run interleaved ``--repeats`` times (ep1, ep2, ep1, ...) so drift in the machine's load hits
both; the 1-minute load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tools.bench_long_context import torchrun_2

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {"ep1": ["parallel.expert=1"], "ep2": ["parallel.expert=2"]}
A2A_FILE = "all_to_all_seconds.rank{rank}.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "moe-tiny.yaml"))
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps per run")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (median)")
    p.add_argument("--repeats", type=int, default=2, help="runs per layout, interleaved")
    p.add_argument("--work-dir", default="runs/bench_moe")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides (key=value)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--warmup, --steps and --repeats must be >= 1")
    return args


# ---------------------------------------------------------------------------- inside each rank
def worker(argv: list[str]) -> None:
    """``bigtrain.pretrain`` with ``torch.distributed.all_to_all_single`` timed per optimizer step; the
    per-step seconds go to ``RUN_DIR/all_to_all_seconds.rankR.json``."""
    import torch

    from bigtrain import pretrain, trainer

    spent = [0.0]
    per_step: list[float] = []
    original = torch.distributed.all_to_all_single

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    torch.distributed.all_to_all_single = timed  # megatron looks it up on every call
    train_step = trainer.Trainer.train_step

    def step(self: trainer.Trainer) -> trainer.StepResult:
        spent[0] = 0.0
        result = train_step(self)
        per_step.append(spent[0])
        return result

    trainer.Trainer.train_step = step  # type: ignore[method-assign]
    cfg = pretrain.config_or_exit(pretrain.parse_args(argv))
    try:
        pretrain.run_or_exit(cfg)
    finally:
        rank = int(os.environ.get("RANK", "0"))
        (Path(cfg.train.run_dir) / A2A_FILE.format(rank=rank)).write_text(json.dumps(per_step))


# ---------------------------------------------------------------------------- the launcher
def run_one(args: argparse.Namespace, layout: str, repeat: int) -> dict[str, Any]:
    """One 2-rank run; its per-step tokens/s and all-to-all share (rank 0). SystemExit with the end of
    the log if the run fails or logs too few steps."""
    run_dir = Path(args.work_dir).resolve() / f"{layout}-{repeat}"
    sets = [
        f"train.steps={args.warmup + args.steps}",
        "train.log_interval=1",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "checkpoint.save=false",
        "data.mock=true",
        f"train.run_dir={run_dir}",
        *LAYOUTS[layout],
        *args.set,
    ]
    module = ["tools.bench_moe", "--worker", "--config", str(Path(args.config).resolve()), "--set", *sets]
    proc, records = torchrun_2(module, run_dir, args.timeout)
    a2a_file = run_dir / A2A_FILE.format(rank=0)
    if proc.returncode != 0 or len(records) < args.warmup + args.steps or not a2a_file.exists():
        log = (proc.stdout + proc.stderr).splitlines()
        tail = "\n".join([line for line in log if line.startswith("bigtrain:")][:4] + log[-15:])
        raise SystemExit(f"bench_moe: {layout} run {repeat} failed (exit {proc.returncode}):\n{tail}")
    a2a = json.loads(a2a_file.read_text())
    timed = range(args.warmup, args.warmup + args.steps)
    return {
        "tokens_per_sec": [records[i]["tokens_per_sec"] for i in timed],
        "step_seconds": [records[i]["step_seconds"] for i in timed],
        "all_to_all_seconds": [a2a[i] for i in timed],
        "all_to_all_share": [a2a[i] / records[i]["step_seconds"] for i in timed],
        "loss_last": records[-1]["loss"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every run (see the module docstring); per layout the medians over all its timed steps."""
    import platform

    import deepspeed
    import megatron.core
    import torch

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {lay: [] for lay in args.layouts}
    for repeat in range(args.repeats):
        for lay in args.layouts:
            runs[lay].append(run_one(args, lay, repeat))
    summary = {}
    for lay, rs in runs.items():
        steps = {
            key: [v for r in rs for v in r[key]]
            for key in ("tokens_per_sec", "all_to_all_share", "step_seconds")
        }
        summary[lay] = {f"median_{k}": statistics.median(v) for k, v in steps.items()}
        summary[lay]["runs"] = rs
    return {
        "config": args.config,
        "extra_sets": args.set,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": summary,
        "total_seconds": time.perf_counter() - started,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "megatron-core": megatron.core.__version__,
        },
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown table, one line per layout."""
    lines = [
        "| layout | tokens/s (median) | step s (median) | all-to-all share of step (median) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for lay, r in report["results"].items():
        lines.append(
            f"| {lay} | {r['median_tokens_per_sec']:,.0f} | {r['median_step_seconds']:.4f} | "
            f"{r['median_all_to_all_share']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return
    args = parse_args(argv)
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(format_table(report))


if __name__ == "__main__":
    main()
