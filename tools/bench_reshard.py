"""Benchmark tools/reshard_checkpoint.py: wall time and peak memory of resharding a real checkpoint, and
whether the peak follows the largest tensor rather than the model (issue 17, BENCHMARKS.md).

    # one run per model: train 1 step at TP1 DP1 ZeRO-1 fp32 (mock data, seq 128), save, then reshard the
    # checkpoint to TP2 PP2 in a fresh child process that reports its own peak RSS
    python tools/bench_reshard.py --config configs/llama-125m.yaml --work /tmp/bench_reshard \\
        --model 125m: --model 125m-48-layers:model.num_layers=48 \\
        --model 125m-vocab-64k:model.vocab_size=64000 --json reshard.json
    # also back from the TP2 PP2 output to TP1 PP1 (a tensor-parallel source: shards merged)
    python tools/bench_reshard.py --model 125m: --back --json back.json

Each ``--model NAME:OVERRIDES`` (comma-separated ``--set`` values) is trained and resharded once. Peak
memory is the child's ``ru_maxrss`` (resident, including the pages of memory-mapped source files while a
parameter is read), next to its RSS after the imports and the source's open (the baseline), so
``peak - baseline`` is what the resharding itself needed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def _rss_mib() -> float:
    """This process's resident memory now (MiB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_checkpoint(config: str, overrides: list[str], run_dir: Path) -> Path:
    """A 1-step checkpoint of ``config`` at TP1 DP1 ZeRO-1, fp32, random tokens; returns its step dir."""
    ckpt = run_dir / "checkpoints" / "step_00000001"
    if (ckpt / "manifest.json").is_file():
        return ckpt
    sets = [
        "data.mock=true",
        "data.train=null",
        "data.tokenizer=null",
        "precision=fp32",
        "zero.stage=1",
        "activation_checkpointing=none",
        "model.seq_length=128",
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        "train.steps=1",
        "train.eval_interval=0",
        "train.log_interval=1",
        "train.device=cpu",
        "checkpoint.interval=1",
        f"train.run_dir={run_dir}",
        *overrides,
    ]
    cmd = [sys.executable, "-m", "bigtrain.pretrain", "--config", config, "--set", *sets]
    with socket.socket() as sock:  # a free port for the one-process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return ckpt


def measure(src: Path, out: Path, tensor: int, pipeline: int) -> dict:
    """Reshard in this process (a fresh child): times and memory."""
    from tools.reshard_checkpoint import reshard

    t0 = time.perf_counter()
    stamps: list[float] = []
    src_, final, state, cfg = reshard(
        src, tensor, pipeline, out=out, progress=lambda key: stamps.append(time.perf_counter())
    )
    total = time.perf_counter() - t0
    from bigtrain.models import layout
    from bigtrain.registry import task_params

    m = state.config.model
    sizes = {
        lp.key: torch.Size(layout.full_shape(lp.spec, m, state.padded_vocab_size)).numel()
        for lp in layout.iter_layer_params(m, task=task_params(state.config))
    }
    largest = max(sizes, key=lambda k: sizes[k])
    return {
        "parameters": sum(sizes.values()),
        "largest_tensor": largest,
        "largest_tensor_mib": sizes[largest] * 4 / MIB,
        "fp32_state_mib": sum(sizes.values()) * 12 / MIB,  # master + 2 moments
        "source_mib": _dir_bytes(src_) / MIB,
        "output_mib": _dir_bytes(final) / MIB,
        "seconds_total": total,
        # first key to last key: reading, merging, sharding and writing (the rest: the source's sha256
        # verification, opening, the output's manifest)
        "seconds_parameters": stamps[-1] - stamps[0] if stamps else 0.0,
        "source_layout": state.layout,
        "target_layout": {"tensor": tensor, "pipeline": pipeline},
    }


def child(args: argparse.Namespace) -> None:
    import tools.reshard_checkpoint  # noqa: F401  (the imports count in the baseline)
    from bigtrain.reshard import open_optimizer_state

    open_optimizer_state(args.src)  # what opening costs (metadata of every file) is in the baseline too
    baseline = _rss_mib()
    row = measure(Path(args.src), Path(args.out), args.tensor, args.pipeline)
    row["baseline_rss_mib"] = baseline
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["peak_minus_baseline_mib"] = row["peak_rss_mib"] - baseline
    print(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "llama-125m.yaml"))
    ap.add_argument("--model", action="append", default=[], help="NAME:OVERRIDE,OVERRIDE (repeatable)")
    ap.add_argument("--work", default="/tmp/bench_reshard", help="where checkpoints and outputs go")
    ap.add_argument("--tensor", type=int, default=2)
    ap.add_argument("--pipeline", type=int, default=2)
    ap.add_argument("--back", action="store_true", help="also reshard each output back to TP1 PP1")
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    from tools.bench import device_name, versions

    work = Path(args.work)
    rows = []
    for spec in args.model or ["125m:"]:
        name, _, sets = spec.partition(":")
        overrides = [s for s in sets.split(",") if s]
        src = make_checkpoint(args.config, overrides, work / name)
        out = work / f"{name}-resharded" / "step_00000001"
        if out.exists():
            shutil.rmtree(out)
        hops = [(src, out, args.tensor, args.pipeline)]
        if args.back:  # the output (layout-free, sharded) merged back to TP1 PP1
            hops.append((out, work / f"{name}-back" / "step_00000001", 1, 1))
        for source, target, tensor, pipeline in hops:
            if target.exists():
                shutil.rmtree(target)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--src", str(source)]
            cmd += ["--out", str(target), "--tensor", str(tensor), "--pipeline", str(pipeline)]
            result = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
            row = {
                "model": name,
                "overrides": overrides,
                **json.loads(result.stdout.strip().splitlines()[-1]),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
        if not args.keep:
            for _, target, _, _ in hops:
                shutil.rmtree(target.parent)
            shutil.rmtree(work / name)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(torch.device("cpu")),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "versions": versions(),
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


if __name__ == "__main__":
    main()
