"""Training throughput of bigtrain against a plain PyTorch loop, in one process on one device.

    python tools/bench.py --config configs/bench-20m.yaml --steps 5 --warmup 2 --repeats 5 --json bench.json
    python tools/bench.py --config configs/bench-1.3b-h100.yaml --json h100.json          # on a GPU
    python tools/bench.py --config configs/bench-1.3b-h100.yaml --compile --json h100c.json

bigtrain runs as in training: ``init_distributed`` (a world of one), ``build_model``,
``initialize_engine`` (DeepSpeed), and ``Trainer.train_step`` (logging, evaluation and checkpoint
hooks left out). The reference (tools/reference_model.py) is the same architecture with the same
shapes, batches, optimizer settings, clipping and checkpointing. Both get the same pre-generated
micro-batches (pinned on CUDA), warm up, then alternate: each repeat times ``--steps`` optimizer
steps of one system and then of the other, with the device synchronized around each timed region,
so both see the same machine load. Reported: median tokens/s over repeats, model TFLOP/s and MFU
(bigtrain.flops; MFU when the device peak is known or ``logging.peak_tflops`` is set), hardware
TFLOP/s (with recomputation), memory, and bigtrain / reference ratios.

Memory: both systems live in the process at once, so the process peak is shared. Each system's own
model+optimizer state is accounted (bigtrain.memory); on CUDA the allocator peak during each
system's timed steps is reported too, on CPU the process RSS high-water.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from itertools import cycle
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bigtrain import flops  # noqa: E402
from bigtrain.config import Config, load_config  # noqa: E402
from bigtrain.perf import attention_kernel  # noqa: E402

GIB = 2**30


def make_batches(cfg: Config, count: int, pin: bool) -> list[dict[str, torch.Tensor]]:
    """Random micro-batches shaped like bigtrain's data iterator gives them (CPU, pinned on CUDA)."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    m, b = cfg.model, cfg.train.micro_batch_size
    out = []
    for _ in range(count):
        tokens = torch.randint(0, m.vocab_size, (b, m.seq_length + 1), generator=g)
        batch = {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, m.seq_length),
        }
        out.append({k: v.pin_memory() for k, v in batch.items()} if pin else batch)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name, module in (("deepspeed", "deepspeed"), ("megatron-core", "megatron.core")):
        try:
            out[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as e:  # reported, not fatal: the bench needs them anyway and fails later
            out[name] = f"unavailable ({e.__class__.__name__})"
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or ""
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} logical cores"


class BigtrainSystem:
    """bigtrain's real start-up and step."""

    name = "bigtrain"

    def __init__(self, cfg: Config, batches: list[dict[str, torch.Tensor]]):
        from bigtrain.distributed import init_distributed
        from bigtrain.engine import initialize_engine
        from bigtrain.registry import build_model
        from bigtrain.trainer import Trainer

        self.dist = init_distributed(cfg)  # not launched: a world of one on a free port
        model = build_model(cfg, topology=self.dist.topology)
        self.engine = initialize_engine(cfg, model, self.dist)
        source = cycle(batches)
        self.trainer = Trainer(cfg, self.dist, self.engine, lambda consumed: source)
        self.trainer.hooks = []  # logging/eval/checkpoints happen at intervals, not in the step
        self.last_loss: float | None = None

    def step(self) -> None:
        self.last_loss = self.trainer.train_step().loss

    def state_bytes(self) -> int:
        from bigtrain.memory import held_tensor_bytes

        return sum(held_tensor_bytes(self.engine).values())

    def close(self) -> None:
        from bigtrain.distributed import shutdown

        self.trainer.metrics.close()
        shutdown()


class ReferenceSystem:
    name = "reference"

    def __init__(
        self, cfg: Config, batches: list[dict[str, torch.Tensor]], device: torch.device, compile: bool
    ):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from reference_model import ReferenceTrainer

        self.trainer = ReferenceTrainer(cfg, device, compile=compile)
        self.accum = cfg.derived.grad_accum_steps
        self.source = cycle(batches)
        self.last_loss: float | None = None
        self._loss: torch.Tensor | None = None

    def step(self) -> None:
        self._loss = self.trainer.train_step([next(self.source) for _ in range(self.accum)])

    def finish(self) -> None:
        if self._loss is not None:
            self.last_loss = float(self._loss)

    def state_bytes(self) -> int:
        from bigtrain.memory import held_tensor_bytes

        return sum(held_tensor_bytes(self.trainer.model, self.trainer.optimizer).values())

    def close(self) -> None:
        pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    overrides = list(args.set)
    if args.compile:
        overrides.append("train.compile=true")
    run_dir = tempfile.mkdtemp(prefix="bigtrain-bench-")
    overrides += [f"train.run_dir={run_dir}", "checkpoint.save=false", "logging.tensorboard=false"]
    cfg = load_config(args.config, overrides).resolve(1)
    from bigtrain.distributed import pick_device

    device = pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    accum = cfg.derived.grad_accum_steps
    batches = make_batches(cfg, max(2, accum * 2), pin=device.type == "cuda")
    systems: list[Any] = [BigtrainSystem(cfg, batches)]
    if not args.no_reference:
        systems.append(ReferenceSystem(cfg, batches, device, args.compile))
    m, vocab = cfg.model, cfg.derived.padded_vocab_size
    tokens_per_step = cfg.train.global_batch_size * m.seq_length
    model_flops = flops.train_flops_per_token(m, vocab)
    hw_flops = flops.hardware_flops_per_token(m, vocab, cfg.activation_checkpointing)
    peak = flops.peak_tflops(device, cfg.logging.peak_tflops)

    def timed(system: Any, steps: int) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) for ``steps`` optimizer steps."""
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            system.step()
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    for system in systems:  # warm-up (DeepSpeed op builds, compilation, allocator growth)
        timed(system, args.warmup)
    per_system = {s.name: {"seconds": [], "cpu_seconds": [], "peak_allocated": 0} for s in systems}
    for repeat in range(args.repeats):
        order = systems if repeat % 2 == 0 else systems[::-1]  # alternate who goes first
        for system in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            wall, cpu = timed(system, args.steps)
            per_system[system.name]["seconds"].append(wall)
            per_system[system.name]["cpu_seconds"].append(cpu)
            if device.type == "cuda":
                per_system[system.name]["peak_allocated"] = max(
                    per_system[system.name]["peak_allocated"], torch.cuda.max_memory_allocated(device)
                )
    results: dict[str, Any] = {}
    for system in systems:
        if hasattr(system, "finish"):
            system.finish()
        data = per_system[system.name]
        rates = [args.steps * tokens_per_step / s for s in data["seconds"]]
        tps = statistics.median(rates)
        r: dict[str, Any] = {
            "tokens_per_sec": tps,
            "tokens_per_sec_per_repeat": rates,
            "step_seconds_median": statistics.median(data["seconds"]) / args.steps,
            # on a shared CPU, wall time includes waiting for cores other jobs hold; CPU time does not
            "tokens_per_cpu_sec": statistics.median(
                args.steps * tokens_per_step / c for c in data["cpu_seconds"]
            ),
            "model_tflops": tps * model_flops / 1e12,
            "hardware_tflops": tps * hw_flops / 1e12,
            "state_gib": system.state_bytes() / GIB,
            "final_loss": system.last_loss,
        }
        if peak:
            r["mfu"] = r["model_tflops"] / peak
        if device.type == "cuda":
            r["peak_allocated_gib"] = data["peak_allocated"] / GIB
        results[system.name] = r
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": args.config,
        "overrides": args.set,
        "compile": args.compile,
        "device": device_name(device),
        "versions": versions(),
        "parameters": flops.num_parameters(m, vocab),
        "precision": cfg.precision,
        "activation_checkpointing": cfg.activation_checkpointing,
        "micro_batch_size": cfg.train.micro_batch_size,
        "global_batch_size": cfg.train.global_batch_size,
        "seq_length": m.seq_length,
        "tokens_per_step": tokens_per_step,
        "model_flops_per_token": model_flops,
        "hardware_flops_per_token": hw_flops,
        "peak_tflops": peak,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": results,
        "process_rss_high_water_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "sdpa": {"backend": attention_kernel(cfg, device)},
    }
    if "reference" in results:
        b, ref = results["bigtrain"], results["reference"]
        report["ratio_tokens_per_sec"] = b["tokens_per_sec"] / ref["tokens_per_sec"]
        pairs = zip(b["tokens_per_sec_per_repeat"], ref["tokens_per_sec_per_repeat"])
        report["ratio_per_repeat"] = [x / y for x, y in pairs]
        report["ratio_per_repeat_median"] = statistics.median(report["ratio_per_repeat"])
        if device.type == "cpu":
            report["ratio_tokens_per_cpu_sec"] = b["tokens_per_cpu_sec"] / ref["tokens_per_cpu_sec"]
    print_table(report)
    for system in systems:
        system.close()
    del systems
    gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def print_table(report: dict[str, Any]) -> None:
    res = report["results"]
    print(
        f"\n{report['device']} | {report['parameters'] / 1e6:.1f}M params, {report['precision']}, "
        f"seq {report['seq_length']}, micro-batch {report['micro_batch_size']}, "
        f"{report['tokens_per_step']:,} tokens/step, ckpt={report['activation_checkpointing']}, "
        f"SDPA: {report['sdpa']['backend']}"
    )
    head = f"{'system':>10} {'tokens/s':>12} {'TFLOP/s':>9} {'hw TFLOP/s':>10} {'MFU':>6} {'state GiB':>9} {'peak GiB':>9}"
    print(head)
    for name, r in res.items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        peak = f"{r['peak_allocated_gib']:.2f}" if "peak_allocated_gib" in r else "n/a"
        print(
            f"{name:>10} {r['tokens_per_sec']:>12,.0f} {r['model_tflops']:>9.3f} {r['hardware_tflops']:>10.3f} "
            f"{mfu:>6} {r['state_gib']:>9.3f} {peak:>9}"
        )
    if "ratio_tokens_per_sec" in report:
        per = ", ".join(f"{x:.3f}" for x in report["ratio_per_repeat"])
        print(
            f"bigtrain / reference tokens/s: {report['ratio_tokens_per_sec']:.3f} (median of per-repeat ratios "
            f"{report['ratio_per_repeat_median']:.3f}; per repeat: {per})"
        )
        if "ratio_tokens_per_cpu_sec" in report:
            print(f"bigtrain / reference tokens per CPU-second: {report['ratio_tokens_per_cpu_sec']:.3f}")
    print(f"process RSS high-water: {report['process_rss_high_water_gib']:.2f} GiB (both systems)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps per system first")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per system (interleaved)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument(
        "--compile", action="store_true", help="train.compile=true and torch.compile the reference"
    )
    p.add_argument("--no-reference", action="store_true", help="time bigtrain only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("tools/bench.py runs one process (bigtrain and the reference on one device)")
    run(args)


if __name__ == "__main__":
    main()
