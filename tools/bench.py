"""Training throughput of bigtrain against what a user would run instead: a plain loop over
``transformers``' ``LlamaForCausalLM`` (SDPA attention) + ``torch.optim.AdamW`` + gradient-norm clipping.

    python tools/bench.py --config configs/bench-20m.yaml --threads 2 --json bench.json
    python tools/bench.py --config configs/bench-1.3b-h100.yaml --json h100.json          # on a GPU
    python tools/bench.py --config configs/bench-1.3b-h100.yaml --compile --json h100c.json

Each side runs as a fresh process, as users run it, and the two alternate: repeat i runs bigtrain then
the loop, repeat i+1 the loop then bigtrain (A/B, B/A, ...), so drift in the machine's load hits both.

* bigtrain: ``python -m bigtrain.pretrain --config CONFIG --set ...`` (``train.log_interval=1``, no
  checkpoints, no TensorBoard, a fresh ``train.run_dir``); its ``metrics.jsonl`` gives the per-step records.
* transformers: this file with ``--worker transformers``: ``LlamaForCausalLM`` built from the same config
  (``bigtrain.models.layout.hf_config_values``, the export's config table) and the same initial weights
  (bigtrain's layout-independent init mapped through the export's tensor mapping,
  ``layout.init_full`` -> ``layout.to_hf``), fed the same micro-batches by bigtrain's data iterator (so
  data loading costs both the same), the mean token loss of the global batch (``loss_mask``) accumulated
  over micro-batches, ``AdamW`` (fused on CUDA; decay on matrices only, as bigtrain), bigtrain's LR
  schedule through ``LambdaLR``, ``clip_grad_norm_``, autocast for bf16/fp16 (with a ``GradScaler`` for
  fp16), ``gradient_checkpointing_enable`` for full recomputation, ``torch.compile`` with ``--compile``.

Both sides write one record per optimizer step when it ends (wall clock ``time``). A step's duration is
the time between its record and the previous one: everything in the training loop (data, step, logging,
bigtrain's hooks). ``--warmup`` steps are discarded, the next ``--steps`` are timed; a run's figure is
the median tokens/s of its timed steps, a side's figure the median over its runs, and the ratio is
bigtrain / transformers (also per pair). Each side's own in-step time (bigtrain's ``step_seconds``,
which leaves out its hooks) is reported too, and tokens per CPU-second of each process (this process
reads the child's CPU time from ``/proc`` when each record appears): on a shared machine, wall time
includes waiting for cores other jobs hold, CPU time much less so. Both sides trained the same model when
their losses agree step by step (``first_step_loss_rel_diff``, ``loss_rel_diff_max``; fp32 on CPU
measured: equal at steps 1-2, within 5.5e-7 over 10 steps at 16M parameters; tests/test_bench.py holds
1e-5).

Threads: ``--threads N`` sets ``OMP_NUM_THREADS`` for both processes (and ``torch.set_num_threads`` in
the loop); default: torch's default here. On a shared machine, the 1-minute load average before and
after is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bigtrain import flops
from bigtrain.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent

SIDES = ("bigtrain", "transformers")
# What the benchmark changes in the user's config, on both sides: a record every step, nothing written
# besides it (the loop writes no checkpoints or TensorBoard either), no validation in the timed steps.
BENCH_OVERRIDES = (
    "train.log_interval=1",
    "train.eval_interval=0",
    "checkpoint.save=false",
    "logging.tensorboard=false",
)


def bench_config(config: str, overrides: list[str]) -> Config:
    return load_config(config, overrides).resolve(1)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name, module in (
        ("deepspeed", "deepspeed"),
        ("megatron-core", "megatron.core"),
        ("transformers", "transformers"),
    ):
        try:
            out[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as e:  # reported, not fatal: the runs that need it fail with the cause
            out[name] = f"unavailable ({e.__class__.__name__})"
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or ""
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:  # platform.processor() is often just "x86_64" on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores"


# ---------------------------------------------------------------------------- the transformers loop
def transformers_model(cfg: Config, device: torch.device):
    """``LlamaForCausalLM`` (SDPA) with bigtrain's initial weights for ``cfg`` (fp32, on ``device``).

    Config and weights go through the HF export's mapping (``bigtrain.models.layout``): every bigtrain
    parameter's full init (``init_full``, seeded by ``train.seed``) converted by ``to_hf`` (vocab padding
    stripped, fused QKV and gate/up split). Raises ValueError if the mapping and the HF model disagree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bigtrain.models import layout

    m = cfg.model
    hf_cfg = LlamaConfig(**layout.hf_config_values(m), attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    state: dict[str, torch.Tensor] = {}
    for lp in layout.iter_layer_params(m):
        full = layout.init_full(lp.spec, lp.index, m, cfg.derived.padded_vocab_size, cfg.train.seed)
        state.update(layout.to_hf(lp, full, m))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if m.tie_embeddings else set()  # HF ties it to the embedding itself
    if unexpected or set(missing) - tied:
        raise ValueError(f"HF export mapping vs LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    return model


def transformers_worker(args: argparse.Namespace) -> None:
    """The plain loop, ``cfg.train.steps`` optimizer steps; one JSON record per step to ``args.out``."""
    import torch.nn.functional as F

    from bigtrain.data import batch_iterator, build_datasets
    from bigtrain.data.datasets import configured_tokenizer
    from bigtrain.distributed import pick_device
    from bigtrain.engine import LRSchedule

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_config(args.config, args.set)
    if cfg.activation_checkpointing == "selective":
        raise SystemExit(
            "bench: transformers has no selective recomputation; use none/full or --no-reference"
        )
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg)
    model = transformers_model(cfg, device).train()
    if cfg.activation_checkpointing == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    forward = torch.compile(model) if args.compile else model
    o, t = cfg.optim, cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda" or None
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    train_ds, _ = build_datasets(cfg, configured_tokenizer(cfg))
    batches = batch_iterator(train_ds, 0, t.micro_batch_size, t.global_batch_size, 0, 1)
    vocab = cfg.model.vocab_size
    with open(args.out, "w", buffering=1) as out:
        for step in range(1, t.steps + 1):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.derived.grad_accum_steps)]
            tokens = sum(float(b["loss_mask"].sum()) for b in micro)  # global-batch token mean, as bigtrain
            total = torch.zeros((), device=device)
            for b in micro:
                ids, labels, mask = (
                    b[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask")
                )
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    logits = forward(input_ids=ids).logits  # [b, s, vocab]
                per_token = F.cross_entropy(logits.float().view(-1, vocab), labels.view(-1), reduction="none")
                loss = (per_token * mask.view(-1)).sum() / max(tokens, 1.0)
                scaler.scale(loss).backward()
                total += loss.detach()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip) if o.grad_clip > 0 else None
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step, "loss": float(total), "step_seconds": time.perf_counter() - t0}
            if norm is not None:
                record["grad_norm"] = float(norm)
            record["mem_gib"] = peak_memory_gib(device)
            out.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
    batches.close()


def peak_memory_gib(device: torch.device) -> float:
    """CUDA allocator peak, else this process's peak RSS (as bigtrain logs ``mem_gib``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ---------------------------------------------------------------------------- one run of one side
def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` and all its threads (``/proc``; 10 ms ticks), None when
    it cannot be read (not Linux, or the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_side(side: str, args: argparse.Namespace, overrides: list[str], work: Path, repeat: int) -> dict:
    """Start one fresh process of ``side`` for warmup + steps optimizer steps and follow its records as they
    are written, adding to each the process's CPU seconds when it appeared (``cpu``: both sides measured
    the same way, by this process polling every 5 ms). Raises SystemExit with the end of its output if
    the run fails."""
    run_dir = work / f"{side}-{repeat}"
    log = work / f"{side}-{repeat}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    sets = [*overrides, f"train.run_dir={run_dir}"]
    if side == "bigtrain":
        cmd = [sys.executable, "-m", "bigtrain.pretrain", "--config", args.config, "--set", *sets]
        records_file = run_dir / "metrics.jsonl"
    else:
        records_file = work / f"{side}-{repeat}.jsonl"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--config", args.config]
        cmd += ["--out", str(records_file), "--threads", str(args.threads or 0), "--set", *sets]
        cmd += ["--compile"] if args.compile else []
    records: list[dict] = []
    pending, reader = b"", None
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        while True:
            finished = proc.poll() is not None  # read once more after the exit: the last records
            if reader is None and records_file.exists():
                reader = open(records_file, "rb")
            if reader is not None:
                pending += reader.read()
                *lines, pending = pending.split(b"\n")
                cpu = cpu_seconds(proc.pid) if lines else None
                for line in lines:
                    record = json.loads(line)
                    if "step_seconds" in record:  # metrics.jsonl: train records (not spike/valid ones)
                        records.append({**record, "cpu": cpu})
            if finished:
                break
            time.sleep(0.005)
    if reader is not None:
        reader.close()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(
            f"bench: {side} run {repeat} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}"
        )
    return {"records": records, "process_seconds": seconds}


def run_figures(records: list[dict], warmup: int, steps: int, tokens_per_step: int) -> dict[str, Any]:
    """Median tokens/s of steps warmup+1 .. warmup+steps: by wall clock between consecutive records, by the
    side's own in-step time, and per CPU-second of its process (None where CPU times are missing or a step
    took under one 10 ms tick); ValueError when the run logged too few steps."""
    by_step = {r["step"]: r for r in records}
    timed = range(warmup + 1, warmup + steps + 1)
    if any(s not in by_step or s - 1 not in by_step for s in timed):
        raise ValueError(
            f"records for steps {timed.start - 1}..{timed.stop - 1} expected, got {sorted(by_step)}"
        )
    wall = [by_step[s]["time"] - by_step[s - 1]["time"] for s in timed]
    if min(wall) <= 0:  # ``time`` is rounded to 1 ms; a step that fast cannot be timed this way
        raise ValueError(f"a step took under the 1 ms resolution of the records ({wall}); use a larger model")
    cpu = [by_step[s].get("cpu") for s in timed]
    cpu_prev = [by_step[s - 1].get("cpu") for s in timed]
    per_cpu = [
        tokens_per_step / (c - p) for c, p in zip(cpu, cpu_prev) if c is not None and p is not None and c > p
    ]
    return {
        "tokens_per_sec": statistics.median(tokens_per_step / w for w in wall),
        "tokens_per_sec_in_step": statistics.median(
            tokens_per_step / by_step[s]["step_seconds"] for s in timed
        ),
        "tokens_per_cpu_sec": statistics.median(per_cpu) if per_cpu else None,
        "losses": [by_step[s]["loss"] for s in sorted(by_step)],
        "peak_mem_gib": max(r.get("mem_gib", 0.0) for r in records),
    }


# ---------------------------------------------------------------------------- the comparison
def median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.warmup < 1:
        raise SystemExit("bench: --warmup must be >= 1 (a step's time is measured from the previous record)")
    overrides = [*args.set, *BENCH_OVERRIDES, f"train.steps={args.warmup + args.steps}"]
    if args.compile:
        overrides.append("train.compile=true")
    cfg = bench_config(args.config, overrides)
    from bigtrain.distributed import pick_device
    from bigtrain.perf import attention_kernel

    device = pick_device(cfg)
    sides = SIDES[:1] if args.no_reference else SIDES
    m, vocab = cfg.model, cfg.derived.padded_vocab_size
    tokens_per_step = cfg.train.global_batch_size * m.seq_length
    out_vocab = flops.output_vocab(m, vocab, cfg.parallel.tensor)
    model_flops = flops.train_flops_per_token(m, out_vocab)
    hw_flops = flops.hardware_flops_per_token(m, out_vocab, cfg.activation_checkpointing)
    peak = flops.peak_tflops(device, cfg.logging.peak_tflops)
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="bigtrain-bench-"))
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for repeat in range(args.repeats):
        order = sides if repeat % 2 == 0 else sides[::-1]  # A/B, B/A, ...: who goes first alternates
        for side in order:
            out = run_side(side, args, overrides, work, repeat)
            figures = run_figures(out["records"], args.warmup, args.steps, tokens_per_step)
            runs[side].append({**figures, "process_seconds": out["process_seconds"]})
            per_cpu = figures["tokens_per_cpu_sec"]
            print(
                f"repeat {repeat} {side:>12}: {figures['tokens_per_sec']:,.0f} tokens/s "
                f"(in-step {figures['tokens_per_sec_in_step']:,.0f}, per CPU-second "
                f"{'n/a' if per_cpu is None else f'{per_cpu:,.0f}'}), process {out['process_seconds']:.0f} s",
                flush=True,
            )
    results: dict[str, Any] = {}
    for side in sides:
        rates = [r["tokens_per_sec"] for r in runs[side]]
        tps = statistics.median(rates)
        r: dict[str, Any] = {
            "tokens_per_sec": tps,
            "tokens_per_sec_per_repeat": rates,
            "tokens_per_sec_in_step": statistics.median(x["tokens_per_sec_in_step"] for x in runs[side]),
            "step_seconds_median": tokens_per_step / tps,
            "model_tflops": tps * model_flops / 1e12,
            "hardware_tflops": tps * hw_flops / 1e12,
            "peak_mem_gib": max(x["peak_mem_gib"] for x in runs[side]),
            "tokens_per_cpu_sec": median_or_none(x["tokens_per_cpu_sec"] for x in runs[side]),
            "tokens_per_cpu_sec_per_repeat": [x["tokens_per_cpu_sec"] for x in runs[side]],
            "losses": runs[side][0]["losses"],  # the first run's; every run trains the same steps
            "first_step_loss": runs[side][0]["losses"][0],
            "final_loss": runs[side][0]["losses"][-1],
            "process_seconds": [x["process_seconds"] for x in runs[side]],
        }
        if peak:
            r["mfu"] = r["model_tflops"] / peak
        results[side] = r
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": args.config,
        "overrides": args.set,
        "compile": args.compile,
        "device": device_name(device),
        "threads": args.threads or torch.get_num_threads(),
        "versions": versions(),
        "parameters": flops.num_parameters(m, vocab),
        "active_parameters": flops.active_parameters(m, vocab),  # MoE: top_k experts per token
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
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "results": results,
        "sdpa": {"backend": attention_kernel(cfg, device)},
        "work_dir": str(work),
    }
    if "transformers" in results:
        b, hf = results["bigtrain"], results["transformers"]
        report["ratio_tokens_per_sec"] = b["tokens_per_sec"] / hf["tokens_per_sec"]
        pairs = zip(b["tokens_per_sec_per_repeat"], hf["tokens_per_sec_per_repeat"])
        report["ratio_per_repeat"] = [x / y for x, y in pairs]
        report["ratio_per_repeat_median"] = statistics.median(report["ratio_per_repeat"])
        report["ratio_tokens_per_sec_in_step"] = b["tokens_per_sec_in_step"] / hf["tokens_per_sec_in_step"]
        if b["tokens_per_cpu_sec"] and hf["tokens_per_cpu_sec"]:
            report["ratio_tokens_per_cpu_sec"] = b["tokens_per_cpu_sec"] / hf["tokens_per_cpu_sec"]
        diffs = [abs(x - y) / abs(y) for x, y in zip(b["losses"], hf["losses"])]
        report["first_step_loss_rel_diff"] = diffs[0]
        report["loss_rel_diff_max"] = max(diffs)
    print_summary(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def print_summary(report: dict[str, Any]) -> None:
    print(
        f"\n{report['device']}, {report['threads']} threads | {report['parameters'] / 1e6:.1f}M params, "
        f"{report['precision']}, seq {report['seq_length']}, micro-batch {report['micro_batch_size']}, "
        f"{report['tokens_per_step']:,} tokens/step, ckpt={report['activation_checkpointing']}, "
        f"SDPA: {report['sdpa']['backend']} | steps {report['warmup'] + 1}-{report['warmup'] + report['steps']}"
        f" of each run, {report['repeats']} run(s) per side"
    )
    print(
        f"{'side':>12} {'tokens/s':>10} {'in-step':>10} {'per CPU-s':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'peak GiB':>8} {'loss 1':>10}"
    )
    for name, r in report["results"].items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        per_cpu = "n/a" if r["tokens_per_cpu_sec"] is None else f"{r['tokens_per_cpu_sec']:,.0f}"
        print(
            f"{name:>12} {r['tokens_per_sec']:>10,.0f} {r['tokens_per_sec_in_step']:>10,.0f} {per_cpu:>10} "
            f"{r['model_tflops']:>8.3f} {mfu:>6} {r['peak_mem_gib']:>8.2f} {r['first_step_loss']:>10.6f}"
        )
    if "ratio_tokens_per_sec" in report:
        per = ", ".join(f"{x:.3f}" for x in report["ratio_per_repeat"])
        print(
            f"bigtrain / transformers tokens/s: {report['ratio_tokens_per_sec']:.3f} (median of per-pair ratios "
            f"{report['ratio_per_repeat_median']:.3f}; per pair: {per}; in-step time: "
            f"{report['ratio_tokens_per_sec_in_step']:.3f})"
        )
        if "ratio_tokens_per_cpu_sec" in report:
            print(f"bigtrain / transformers tokens per CPU-second: {report['ratio_tokens_per_cpu_sec']:.3f}")
        print(
            f"loss, relative difference: first step {report['first_step_loss_rel_diff']:.1e}, "
            f"largest over steps 1-{len(report['results']['bigtrain']['losses'])} {report['loss_rel_diff_max']:.1e}"
        )
    before, after = report["load_average_1min"]
    print(f"1-minute load average: {before:.2f} before, {after:.2f} after")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed optimizer steps at the start of each run")
    p.add_argument("--repeats", type=int, default=3, help="runs per side (interleaved pairs)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both sides (0: default)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument(
        "--work-dir", default=None, help="run directories, records and logs (default: a new temp dir)"
    )
    p.add_argument("--compile", action="store_true", help="train.compile=true and torch.compile the HF model")
    p.add_argument("--no-reference", action="store_true", help="run bigtrain only")
    p.add_argument("--worker", choices=["transformers"], help=argparse.SUPPRESS)  # one side's process
    p.add_argument("--out", help=argparse.SUPPRESS)  # the worker's per-step records
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        transformers_worker(args)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("tools/bench.py starts one process per run itself; do not launch it")
    run(args)


if __name__ == "__main__":
    main()
