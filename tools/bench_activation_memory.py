"""Activation memory per rank by sequence length, TP2 vs TP2+SP vs CP2: what autograd saves for one
micro-batch (saved-tensor accounting, ``bigtrain.memory.rank_saved_activation_bytes``), measured in a real
2-process gloo group, next to ``bigtrain.planner.activation_memory``'s prediction.

The model is tools/bench_long_context.py's (configs/tiny.yaml reshaped: 4 layers, hidden 256, 8 heads,
4 KV heads, FFN 512), micro-batch 1, fp32. Each (layout, recompute) is measured at every length in one
launch of two ranks (``--worker`` mode of this script); the heavier rank is reported.

    python tools/bench_activation_memory.py --seq 1024 2048 4096 8192 16384 --json mem.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.bench_long_context import LAYOUTS, MODEL  # noqa: E402


def worker(out: str, runs_json: str) -> None:
    """One rank: every run of ``runs_json`` (``{name: {"port": P, "config": PATH, "set": [...]}}``) on its
    own port; writes ``{name: saved bytes}`` to ``out/rank{R}.json``."""
    import torch

    from bigtrain.memory import rank_saved_activation_bytes

    torch.set_num_threads(1)
    result = {}
    for name, run in json.loads(Path(runs_json).read_text()).items():
        os.environ["MASTER_PORT"] = str(run["port"])
        result[name] = rank_saved_activation_bytes(run["config"], run["set"])
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(
    runs: dict[str, list[str]], config: str, timeout: float, env: dict[str, str] | None = None
) -> dict[str, list[int]]:
    """{name: [rank 0 bytes, rank 1 bytes]} from one launch of two ranks (``runs``: name -> overrides of
    ``config``; ``env``: the ranks' base environment, default this process's). Raises SystemExit with the
    end of a failing rank's log."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            name: {"port": _free_port(), "config": config, "set": overrides}
            for name, overrides in runs.items()
        }
        (Path(tmp) / "runs.json").write_text(json.dumps(spec))
        env = {**(os.environ if env is None else env), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
        env.setdefault("DS_ACCELERATOR", "cpu")
        logs = [Path(tmp) / f"rank{r}.log" for r in (0, 1)]
        procs = []
        for r in (0, 1):
            cmd = [sys.executable, __file__, "--worker", str(Path(tmp) / "out"), str(Path(tmp) / "runs.json")]
            with logs[r].open("w") as log:
                procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO))  # fmt: skip
        try:
            for proc in procs:
                proc.wait(timeout=timeout)
        finally:
            for proc in procs:
                proc.kill()
        for proc, log in zip(procs, logs):
            if proc.returncode != 0:
                raise SystemExit(f"a rank failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
        ranks = [json.loads((Path(tmp) / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {name: [ranks[0][name], ranks[1][name]] for name in runs}


def predicted(config: str, overrides: list[str]) -> int:
    from bigtrain import planner
    from bigtrain.config import load_config

    cfg = load_config(config, overrides).resolve(2)
    return planner.activation_memory(cfg, planner.Layout.of(cfg))[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--recompute", nargs="+", choices=["none", "selective", "full"], default=["none", "full"])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json")
    args = p.parse_args(argv)
    base = [*MODEL, "train.micro_batch_size=1", "train.global_batch_size=1", "precision=fp32"]
    runs = {
        f"{layout}/{mode}/{seq}": [
            *base,
            *over,
            f"activation_checkpointing={mode}",
            f"model.seq_length={seq}",
        ]
        for mode in args.recompute
        for layout, over in LAYOUTS.items()
        for seq in args.seq
    }
    measured = measure(runs, args.config, args.timeout)
    rows: list[dict[str, Any]] = []
    print("| seq | recompute | layout | MiB per rank (heavier) | predicted MiB | pred/meas | TP2 ÷ this |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for mode in args.recompute:
        for seq in args.seq:
            tp2 = max(measured[f"tp2/{mode}/{seq}"])
            for layout in LAYOUTS:
                name = f"{layout}/{mode}/{seq}"
                got, pred = max(measured[name]), predicted(args.config, runs[name])
                rows.append({"seq": seq, "recompute": mode, "layout": layout, "bytes": measured[name],
                             "predicted": pred})  # fmt: skip
                print(f"| {seq} | {mode} | {layout} | {got / 2**20:.2f} | {pred / 2**20:.2f} | {pred / got:.4f} | "
                      f"{tp2 / got:.2f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
