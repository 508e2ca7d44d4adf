"""Context-parallel attention at CP2 on CPU (gloo): DeepSpeed-Ulysses against torch's ring attention.

Issue 18 asks to choose between the two library implementations with measurements. For causal GQA
attention (batch 1) at each sequence length this measures, against one process running
``F.scaled_dot_product_attention(is_causal=True)`` on the whole sequence:

* correctness: the max relative error (``max |x - ref| / max |ref|``, over the whole tensor) of the
  forward output and the q/k/v gradients, gathered back into sequence order;
* forward+backward time: median of ``--repeats`` timed iterations after ``--warmup`` untimed ones, wall
  clock and the process's CPU time (on a shared machine, wall time includes waiting for cores other
  jobs hold; CPU time much less so); a distributed iteration's figure is the slower rank's (both ranks
  start it together after a barrier). Speed-up: the one-process median over the method's.

Methods (two processes, one thread each, gloo):

* ``ulysses``: ``deepspeed.sequence.layer.DistributedAttention`` wrapping SDPA; contiguous sequence
  chunks, all-to-all from sequence- to head-sharding and back (q heads and KV heads split over ranks).
* ``ring-dispatch``: torch's ``context_parallel(mesh, buffers=..., buffer_seq_dims=...)`` context
  manager (head-tail load balancing) around a plain SDPA call, the way torch documents it. Its dispatch
  handles only the CUDA kernels (flash, efficient, cudnn); on CPU SDPA reaches
  ``aten._scaled_dot_product_flash_attention_for_cpu`` and DTensor raises. The error is reported.
* ``ring``: the same load-balanced sharding (``context_parallel``) and torch's own ring algorithm
  (``_templated_ring_attention`` and its backward, the functions its CUDA dispatch calls) with the CPU
  flash kernel plugged in, so the ring's communication and compute pattern is measured on this machine.
  ``--rotate`` picks ``set_rotate_method`` (``allgather``, torch's default, or ``alltoall``).

The one-process baseline runs on rank 0 (one thread) while rank 1 waits, interleaved with the CP
methods; the CP2 columns use twice the cores, so the ideal CP2 time is half the baseline's.

Usage: ``python tools/bench_context_attention.py --seq 1024 2048 4096 8192 [--json out.json]``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

METHODS = ("ulysses", "ring")
TENSORS = ("out", "dq", "dk", "dv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="sequence lengths")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA when fewer than --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per method and length")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations; the median is reported")
    p.add_argument(
        "--rotate", choices=("allgather", "alltoall"), default="allgather", help="ring KV rotation"
    )
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    cp = 2
    for s in args.seq:
        if s % (2 * cp):  # head-tail load balancing splits the sequence into 2 x CP chunks
            p.error(f"--seq {s}: must be divisible by {2 * cp} (2 chunks per CP rank)")
    if args.heads % args.kv_heads or args.kv_heads % cp:
        p.error(f"--heads {args.heads} / --kv-heads {args.kv_heads}: KV heads must divide the query heads "
                f"and be divisible by CP={cp} (Ulysses splits KV heads over ranks)")  # fmt: skip
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be >= 1")
    return args


def make_inputs(
    args: argparse.Namespace, seq: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, heads, seq, head_dim], k and v [1, kv_heads, seq, head_dim], and the upstream gradient of
    the output (shaped like q); fp32, the same on every process (seeded by ``seq``)."""
    g = torch.Generator().manual_seed(seq)
    q = torch.randn(1, args.heads, seq, args.head_dim, generator=g)
    k = torch.randn(1, args.kv_heads, seq, args.head_dim, generator=g)
    v = torch.randn(1, args.kv_heads, seq, args.head_dim, generator=g)
    dout = torch.randn(1, args.heads, seq, args.head_dim, generator=g)
    return q, k, v, dout


def sdpa_fwd_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> dict:
    """One causal GQA SDPA forward+backward on full [B, H, S, D] tensors: output and q/k/v gradients."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def max_rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x - ref| / max |ref|`` (a norm-wise relative error: element-wise ratios blow up where the
    reference is near zero)."""
    if x.shape != ref.shape:
        raise ValueError(f"shape {tuple(x.shape)} != reference {tuple(ref.shape)}")
    return float((x - ref).abs().max() / ref.abs().max())


def _timed(fn: Callable[[], Any], sync: Callable[[float], float]) -> tuple[float, float]:
    """One call of ``fn``: (wall seconds, CPU seconds of this process), each turned by ``sync`` into the
    iteration's figure (the slower rank's); ``sync`` also lines the ranks up before the call. CPU time
    leaves out waiting for a core that other jobs hold (and gloo's blocking waits)."""
    sync(0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return sync(wall), sync(cpu)


# ---------------------------------------------------------------- workers (one per CP rank)


def _ulysses(
    group: Any,
    args: argparse.Namespace,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
) -> tuple[Callable[[], dict], Callable[[], dict]]:
    """DistributedAttention over [B, S/CP, H, D] contiguous chunks (batch_dim_idx=0: scatter heads,
    dim 2; gather sequence, dim 1); returns one forward+backward giving full-sequence tensors."""
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention

    class LocalSDPA(torch.nn.Module):
        """SDPA on [B, S, H_local, D] (what the all-to-all hands over), causal, GQA by KV groups."""

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            return o.transpose(1, 2)

    attn = DistributedAttention(LocalSDPA(), group, scatter_idx=2, gather_idx=1)
    rank, cp = dist.get_rank(group), dist.get_world_size(group)

    def local(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> this rank's [B, S/CP, H, D]
        return t.chunk(cp, dim=2)[rank].transpose(1, 2).contiguous()

    lq, lk, lv, ldout = (local(t) for t in (q, k, v, dout))

    def step() -> dict:
        tq, tk, tv = (t.detach().requires_grad_() for t in (lq, lk, lv))
        out = attn(tq, tk, tv, batch_dim_idx=0)
        out.backward(ldout)
        return {"out": out.detach(), "dq": tq.grad, "dk": tk.grad, "dv": tv.grad}

    def gather(r: dict) -> dict:  # contiguous chunks: all-gather along the sequence, back to [B, H, S, D]
        full = {}
        for name, t in r.items():
            parts = [torch.empty_like(t) for _ in range(cp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            full[name] = torch.cat(parts, dim=1).transpose(1, 2)
        return full

    return lambda: gather(step()), step


class _RingCPU(torch.autograd.Function):
    """torch's ring attention (the functions its CUDA SDPA dispatch calls) with the CPU flash kernel."""

    @staticmethod
    def forward(ctx: Any, group: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _templated_ring_attention,
        )

        out, lse = _templated_ring_attention(
            group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, q, k, v, is_causal=True
        )[:2]
        ctx.group = group
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor, torch.Tensor]:
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _templated_ring_attention_backward,
        )

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _templated_ring_attention_backward(
            ctx.group,
            2,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
            grad_out=dout.contiguous(),
            grad_out_name="grad_out",
            query=q,
            key=k,
            value=v,
            out=out,
            logsumexp=lse,
            is_causal=True,
            dropout_p=0.0,
        )[:3]
        return None, dq, dk, dv


def _ring(
    mesh: Any,
    args: argparse.Namespace,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    dispatch: bool,
) -> tuple[Callable[[], dict], Callable[[], dict]]:
    """Load-balanced ring CP through ``context_parallel``: the buffers (full [B, H, S, D] tensors) are
    head-tail sharded on entry; ``dispatch`` calls plain SDPA (torch's documented use), otherwise
    ``_RingCPU``. Results are put back in sequence order with ``context_parallel_unshard``."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        context_parallel_unshard,
        set_rotate_method,
    )

    set_rotate_method(args.rotate)
    group = mesh.get_group()

    def step() -> dict:
        bq, bk, bv, bdout = (t.clone() for t in (q, k, v, dout))  # sharded in place by context_parallel
        with context_parallel(mesh, buffers=[bq, bk, bv, bdout], buffer_seq_dims=[2, 2, 2, 2]):
            tq, tk, tv = (t.detach().requires_grad_() for t in (bq, bk, bv))
            if dispatch:
                out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
            else:
                out = _RingCPU.apply(group, tq, tk, tv)
            out.backward(bdout)
        return {"out": out.detach(), "dq": tq.grad, "dk": tk.grad, "dv": tv.grad}

    def gather(r: dict) -> dict:
        names = list(r)
        full = context_parallel_unshard(mesh, [r[n] for n in names], [2] * len(names))
        return dict(zip(names, full))

    return lambda: gather(step()), step


def _worker(rank: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    """One CP rank. Per length: builds every method, checks each once against the reference (rank 0's
    one-process SDPA), then times them interleaved (warm-up rounds, then ``repeats`` rounds of every
    method in turn), so a change in the machine's load hits all methods alike. The one-process
    baseline runs on rank 0 while rank 1 waits at the barrier. Rank 0 writes ``workers.json``."""
    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(LOCAL_RANK=str(rank))
    import deepspeed
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # DistributedAttention's deepspeed.comm
    mesh = init_device_mesh("cpu", (2,))
    group = mesh.get_group()

    def slower_rank(dt: float) -> float:
        t = torch.tensor([dt], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return float(t)

    report: dict = {}
    for seq in args.seq:
        inputs = make_inputs(args, seq)
        steps: dict[str, Callable[[], Any]] = {}
        row: dict = {}
        reference = sdpa_fwd_bwd(*inputs) if rank == 0 else None
        steps["single"] = functools.partial(sdpa_fwd_bwd, *inputs) if rank == 0 else (lambda: None)
        for method in (*METHODS, "ring-dispatch"):
            try:
                if method == "ulysses":
                    full, steps[method] = _ulysses(group, args, *inputs)
                else:
                    full, steps[method] = _ring(mesh, args, *inputs, dispatch=method == "ring-dispatch")
                result = full()
                if reference is not None:
                    errors = {n: max_rel_error(result[n], reference[n]) for n in TENSORS}
                    row[method] = {"max_rel_error": errors, "max_rel_error_max": max(errors.values())}
            except Exception as e:  # reported per method; the other methods still run
                row[method] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
                steps.pop(method, None)
                if method != "ring-dispatch":
                    traceback.print_exc()
                dist.barrier(group=group)
        times: dict[str, list[tuple[float, float]]] = {m: [] for m in steps}
        for i in range(args.warmup + args.repeats):
            for method, step in steps.items():
                wall_cpu = _timed(step, slower_rank)
                if i >= args.warmup:
                    times[method].append(wall_cpu)
        for method, pairs in times.items():
            wall, cpu = [w for w, _ in pairs], [c for _, c in pairs]
            row.setdefault(method, {}).update(
                seconds=wall,
                median_s=statistics.median(wall),
                cpu_seconds=cpu,
                median_cpu_s=statistics.median(cpu),
            )
        base, base_cpu = row["single"]["median_s"], row["single"]["median_cpu_s"]
        for method in times:
            row[method]["speedup"] = base / row[method]["median_s"]
            row[method]["cpu_speedup"] = base_cpu / row[method]["median_cpu_s"]
        report[str(seq)] = {"single": row.pop("single"), **row}
    if rank == 0:
        (Path(out_dir) / "workers.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- driver


def run(args: argparse.Namespace) -> dict:
    """Two workers (see :func:`_worker`); returns the report (see the module docstring)."""
    import deepspeed
    import torch.multiprocessing as mp

    from bigtrain.distributed import _free_port

    with tempfile.TemporaryDirectory(prefix="bench_cp_") as tmp:
        mp.spawn(_worker, args=(_free_port(), args, tmp), nprocs=2, join=True)
        results = json.loads((Path(tmp) / "workers.json").read_text())
    report = {
        "config": {
            k: getattr(args, k) for k in ("heads", "kv_heads", "head_dim", "warmup", "repeats", "rotate")
        },
        "cp": 2,
        "threads_per_process": 1,
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "python": sys.version.split()[0],
        },
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def format_table(report: dict) -> str:
    """Markdown table: per length and method, median wall and CPU seconds of fwd+bwd, the speed-ups over
    one process (its median / the method's), the max relative errors."""
    lines = [
        "| seq | method | fwd+bwd s | speed-up | CPU s (slower rank) | CPU speed-up | max rel err (out, dq, dk, dv) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for seq, row in report["results"].items():
        for method, r in row.items():
            if "error" in r:
                lines.append(f"| {seq} | {method} | — | — | — | — | fails: `{r['error']}` |")
                continue
            times = (
                f"{r['median_s']:.3f} | {r['speedup']:.2f} | {r['median_cpu_s']:.3f} | {r['cpu_speedup']:.2f}"
            )
            if method == "single":
                lines.append(f"| {seq} | one process (SDPA) | {times} | reference |")
            else:
                errs = ", ".join(f"{r['max_rel_error'][n]:.1e}" for n in TENSORS)
                lines.append(f"| {seq} | {method} CP2 | {times} | {errs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))


if __name__ == "__main__":
    main()
