"""Memory benchmark: model+optimizer state per rank under ZeRO 0-3, and activation memory under
checkpointing none/selective/full, each next to bigtrain.planner's prediction.

    # per-rank state memory, DP=2 (launches 2 gloo processes itself), ZeRO 0-3, one engine after another
    python tools/bench_memory.py state --config configs/bench-150m-cpu.yaml --nproc 2 --json state.json
    # activations saved by one forward (saved_tensors_hooks), and fwd+bwd time, per checkpointing mode
    python tools/bench_memory.py activations --config configs/bench-150m-cpu.yaml --set model.seq_length=1024

State memory is measured by accounting (bigtrain.memory.held_tensor_bytes over the DeepSpeed engine
after the second backward pass, when parameters, gradients and optimizer states all exist), because
RSS on CPU does not show ZeRO-3's savings. Process RSS high-water is reported next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bigtrain.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent

MIB = 2**20


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(cfg: Config, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    m, b = cfg.model, cfg.train.micro_batch_size
    tokens = torch.randint(0, m.vocab_size, (b, m.seq_length), generator=generator)
    return tokens, tokens.roll(-1, dims=1), torch.ones(b, m.seq_length)


# ---------------------------------------------------------------------------- ZeRO state (worker)
def state_worker(args: argparse.Namespace) -> None:
    """One rank: for each ZeRO stage, an engine, two steps, the tensors it holds after backward."""
    from bigtrain import planner
    from bigtrain.distributed import init_distributed, shutdown
    from bigtrain.engine import initialize_engine
    from bigtrain.memory import held_tensor_bytes
    from bigtrain.registry import build_model

    cfg = load_config(args.config, args.set).resolve(int(os.environ["WORLD_SIZE"]))
    dist = init_distributed(cfg)
    rows = []
    for stage in args.stages:
        cfg.zero.stage = stage
        model = build_model(cfg, topology=dist.topology)
        engine = initialize_engine(cfg, model, dist)
        gen = torch.Generator().manual_seed(cfg.train.seed + dist.rank)
        times = []
        held = 0
        for step in range(args.steps):
            t0 = time.perf_counter()
            loss = engine(*_batch(cfg, gen))
            engine.backward(loss)
            if step == 1:  # second backward: optimizer states exist, gradients not yet consumed
                del loss
                gc.collect()
                held = held_tensor_bytes(engine).get(str(dist.device), 0)
            engine.step()
            times.append(time.perf_counter() - t0)
        layout = planner.Layout(
            tensor=cfg.parallel.tensor,
            pipeline=cfg.parallel.pipeline,
            data=cfg.derived.data_parallel_size,
            zero=stage,
            micro_batch=cfg.train.micro_batch_size,
            offload=cfg.zero.offload_optimizer,
        )
        predicted = planner.state_memory(cfg, layout)
        rows.append(
            {
                "stage": stage,
                "rank": dist.rank,
                "accounted_bytes": held,
                "predicted_bytes": predicted.states,
                "predicted": predicted.as_dict(),
                "rss_high_water_mib": _rss_mib(),
                "step_seconds_median": statistics.median(times[1:]) if len(times) > 1 else times[0],
            }
        )
        del engine, model
        gc.collect()
    gathered: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, rows)
    if dist.is_main:
        Path(args.worker_out).write_text(json.dumps([r for ranks in gathered for r in ranks]))
    shutdown()


def run_state(args: argparse.Namespace) -> dict[str, Any]:
    """Launch ``--nproc`` gloo ranks of :func:`state_worker`; summarize per stage."""
    from bigtrain import flops

    out = Path(args.json or "bench_memory_state.json")
    tmp = out.with_suffix(".ranks.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.nproc}",
        f"--master_port={args.port}",
        __file__,
        "state-worker",
        "--worker-out",
        str(tmp),
        "--steps",
        str(args.steps),
        "--stages",
        *map(str, args.stages),
    ]
    if args.config:
        cmd += ["--config", args.config]
    if args.set:
        cmd += ["--set", *args.set]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    subprocess.run(cmd, check=True, env=env)
    rows = json.loads(tmp.read_text())
    tmp.unlink()
    cfg = load_config(args.config, args.set).resolve(args.nproc)
    params = flops.num_parameters(cfg.model, cfg.derived.padded_vocab_size)
    stages = {}
    for stage in args.stages:
        mine = [r for r in rows if r["stage"] == stage]
        worst = max(mine, key=lambda r: r["accounted_bytes"])
        stages[stage] = {
            "accounted_mib_per_rank": [
                r["accounted_bytes"] / MIB for r in sorted(mine, key=lambda r: r["rank"])
            ],
            "predicted_mib": worst["predicted_bytes"] / MIB,
            "prediction_error": worst["predicted_bytes"] / worst["accounted_bytes"] - 1,
            "bytes_per_parameter": worst["accounted_bytes"] / params,
            "rss_high_water_mib": max(r["rss_high_water_mib"] for r in mine),
            "step_seconds_median": max(r["step_seconds_median"] for r in mine),
        }
    result: dict[str, Any] = {
        "mode": "state",
        "parameters": params,
        "data_parallel": args.nproc,
        "precision": cfg.precision,
        "stages": stages,
    }
    if 0 in stages and 3 in stages:
        base = max(stages[0]["accounted_mib_per_rank"])
        result["zero3_over_zero0"] = max(stages[3]["accounted_mib_per_rank"]) / base
    print(
        f"\nmodel {params / 1e6:.1f}M parameters, DP={args.nproc}, {cfg.precision}; per-rank model+optimizer state"
    )
    print(f"{'ZeRO':>5} {'accounted MiB':>14} {'B/param':>8} {'planner MiB':>12} {'error':>7} {'RSS MiB':>8}")
    for stage, s in stages.items():
        print(
            f"{stage:>5} {max(s['accounted_mib_per_rank']):>14.1f} {s['bytes_per_parameter']:>8.2f} "
            f"{s['predicted_mib']:>12.1f} {s['prediction_error']:>+7.1%} {s['rss_high_water_mib']:>8.0f}"
        )
    if "zero3_over_zero0" in result:
        print(f"ZeRO-3 / ZeRO-0 per-rank state: {result['zero3_over_zero0']:.3f}")
    out.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------- activations
def run_activations(args: argparse.Namespace) -> dict[str, Any]:
    """One process: saved-activation bytes and fwd+bwd time per checkpointing mode (interleaved)."""
    from bigtrain import planner
    from bigtrain.distributed import _free_port, init_distributed, shutdown
    from bigtrain.memory import saved_activation_bytes
    from bigtrain.registry import build_model

    modes = args.modes
    cfg = load_config(args.config, args.set).resolve(1)
    # a world of one process, as training runs (megatron-core's cross entropy, as in training)
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )
    init_distributed(cfg)
    models = {}
    for mode in modes:
        c = load_config(args.config, [*args.set, f"activation_checkpointing={mode}"]).resolve(1)
        models[mode] = (c, build_model(c))
    gen = torch.Generator().manual_seed(0)
    batch = _batch(cfg, gen)
    result: dict[str, Any] = {"mode": "activations", "modes": {}}
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu_times: dict[str, list[float]] = {m: [] for m in modes}
    for mode, (c, model) in models.items():
        saved = saved_activation_bytes(model, lambda model=model: model(*batch))
        layout = planner.Layout(micro_batch=c.train.micro_batch_size, checkpointing=mode)
        predicted, transient = planner.activation_memory(c, layout)
        result["modes"][mode] = {
            "saved_bytes": saved,
            "predicted_bytes": predicted,
            "prediction_error": predicted / saved - 1,
            "predicted_transient_bytes": transient,
        }
    for _ in range(args.warmup):
        for _, model in models.values():
            model(*batch).backward()
    for _ in range(args.repeats):  # interleaved: every mode sees the same machine load
        for mode, (_, model) in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            model(*batch).backward()
            times[mode].append(time.perf_counter() - t0)
            cpu_times[mode].append(time.process_time() - c0)  # not inflated by other jobs' load
            model.zero_grad(set_to_none=True)
    base = result["modes"]["none"] if "none" in modes else None
    for mode in modes:
        r = result["modes"][mode]
        r["fwd_bwd_seconds_median"] = statistics.median(times[mode])
        r["fwd_bwd_seconds"] = times[mode]
        r["fwd_bwd_cpu_seconds_median"] = statistics.median(cpu_times[mode])
        if base:
            r["memory_vs_none"] = r["saved_bytes"] / base["saved_bytes"]
            r["time_vs_none"] = r["fwd_bwd_seconds_median"] / base["fwd_bwd_seconds_median"]
            r["cpu_time_vs_none"] = r["fwd_bwd_cpu_seconds_median"] / base["fwd_bwd_cpu_seconds_median"]
    m = cfg.model
    print(
        f"\nactivations: {m.num_layers} layers, h={m.hidden_size}, seq {m.seq_length}, "
        f"micro-batch {cfg.train.micro_batch_size}, {cfg.precision}"
    )
    print(
        f"{'mode':>10} {'saved MiB':>10} {'planner MiB':>12} {'error':>7} {'vs none':>8} {'fwd+bwd s':>10} {'vs none':>8} {'CPU s':>7} {'vs none':>8}"
    )
    for mode in modes:
        r = result["modes"][mode]
        print(
            f"{mode:>10} {r['saved_bytes'] / MIB:>10.1f} {r['predicted_bytes'] / MIB:>12.1f} "
            f"{r['prediction_error']:>+7.1%} {r.get('memory_vs_none', 1):>8.3f} "
            f"{r['fwd_bwd_seconds_median']:>10.3f} {r.get('time_vs_none', 1):>8.3f} "
            f"{r['fwd_bwd_cpu_seconds_median']:>7.3f} {r.get('cpu_time_vs_none', 1):>8.3f}"
        )
    shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["state", "activations", "state-worker"])
    p.add_argument("--config", default=str(REPO / "configs" / "bench-150m-cpu.yaml"))
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--nproc", type=int, default=2, help="state: data-parallel ranks")
    p.add_argument("--port", type=int, default=29517, help="state: rendezvous port")
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=3, help="state: steps per stage (>= 2)")
    p.add_argument("--modes", nargs="+", default=["none", "selective", "full"])
    p.add_argument("--repeats", type=int, default=5, help="activations: timed fwd+bwd per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode == "state-worker":
        state_worker(args)
    elif args.mode == "state":
        if args.steps < 2:
            raise SystemExit("--steps must be >= 2 (memory is accounted after the second backward)")
        run_state(args)
    else:
        run_activations(args)


if __name__ == "__main__":
    main()
