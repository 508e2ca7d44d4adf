"""tools/bench.py: both sides (``python -m bigtrain.pretrain`` and the plain transformers loop) run the same
model from the same initial weights, the interleaving and the figures are what the docstring says; the GPU
fast-path pieces work (train.compile regions give the same loss and gradients, the SDPA kernel is detected
by profiling)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import pytest
import torch
import torch.nn.functional as F

from bigtrain import flops
from bigtrain.config import load_config
from tests.conftest import REPO, cpu_env, gpu_env, run_cmd
from tests.models.test_layout import tiny_cfg, world_of_one  # noqa: F401  (fixture)
from tools import bench

TINY = str(REPO / "configs" / "tiny.yaml")
BENCH = str(REPO / "tools" / "bench.py")


def _bench(tmp_path, *extra: str, env: dict | None = None) -> dict:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, BENCH, "--config", TINY, "--json", str(out), "--work-dir", str(tmp_path / "work")]
    proc = run_cmd([*cmd, *extra], env=env or cpu_env())
    assert "bigtrain / transformers tokens/s" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


def _check_report(report: dict, device_cuda: bool) -> None:
    cfg = load_config(TINY).resolve(1)
    assert report["tokens_per_step"] == cfg.train.global_batch_size * cfg.model.seq_length
    assert report["model_flops_per_token"] == flops.train_flops_per_token(
        cfg.model, cfg.derived.padded_vocab_size
    )
    assert report["parameters"] == flops.num_parameters(cfg.model, cfg.derived.padded_vocab_size)
    for name in ("bigtrain", "transformers"):
        r = report["results"][name]
        assert len(r["tokens_per_sec_per_repeat"]) == report["repeats"]
        assert all(t > 0 for t in r["tokens_per_sec_per_repeat"]) and r["tokens_per_sec_in_step"] > 0
        assert r["tokens_per_sec"] == statistics.median(r["tokens_per_sec_per_repeat"])
        assert r["model_tflops"] == pytest.approx(
            r["tokens_per_sec"] * report["model_flops_per_token"] / 1e12
        )
        assert len(r["losses"]) == report["warmup"] + report["steps"]
        # random tokens from the init: losses near ln(vocab)
        assert abs(r["final_loss"] - math.log(cfg.model.vocab_size)) < 1.0
        assert r["peak_mem_gib"] > 0
        assert ("mfu" in r) == bool(report["peak_tflops"])
    b, hf = report["results"]["bigtrain"], report["results"]["transformers"]
    assert report["ratio_tokens_per_sec"] == pytest.approx(b["tokens_per_sec"] / hf["tokens_per_sec"])
    assert len(report["ratio_per_repeat"]) == report["repeats"]
    for key in ("deepspeed", "megatron-core", "transformers", "torch"):
        assert report["versions"][key][0].isdigit(), report["versions"]


def test_bench_cpu_tiny_both_sides_train_the_same_model(tmp_path):
    """Both sides report positive throughput, and the transformers loop built from bigtrain's init through
    the HF export mapping trains the same model: every step's loss (the first: same weights and batch;
    later ones: same optimizer, schedule and clipping) within 1e-5 relative (measured: equal, then ~1e-7)."""
    report = _bench(tmp_path, "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1")
    _check_report(report, device_cuda=False)
    assert report["peak_tflops"] is None and report["threads"] == 1
    # bigtrain's side is a `python -m bigtrain.pretrain` run: its run directory, as users get it
    assert {"config.yaml", "metrics.jsonl", "finished.json"} <= {
        p.name for p in (tmp_path / "work" / "bigtrain-0").iterdir()
    }
    assert report["sdpa"]["backend"] in ("flash (cpu)", "math")
    assert report["first_step_loss_rel_diff"] <= 1e-5
    b, hf = report["results"]["bigtrain"]["losses"], report["results"]["transformers"]["losses"]
    assert b == pytest.approx(hf, rel=1e-5, abs=0)
    assert report["loss_rel_diff_max"] <= 1e-5
    for r in report["results"].values():  # this process read each child's CPU time from /proc
        assert r["tokens_per_cpu_sec"] > 0
    # control: another seed's init (train.seed) is told apart by that tolerance (measured: 1.3e-3 relative)
    records = tmp_path / "seed2.jsonl"
    cmd = [sys.executable, BENCH, "--worker", "transformers", "--config", TINY, "--out", str(records)]
    run_cmd([*cmd, "--set", "train.steps=1", "train.seed=2", f"train.run_dir={tmp_path / 'seed2'}"])
    other = json.loads(records.read_text().splitlines()[0])["loss"]
    assert abs(other - b[0]) / b[0] > 1e-4


def _fake_run_side(calls: list, seconds: dict):
    """run_side stand-in: step times ``seconds[side][repeat]`` after slow warm-up steps, in-step time half
    of that, CPU time 1.5x."""

    def run_side(side, args, overrides, work, repeat):
        calls.append((repeat, side))
        t, records = 1000.0, []
        for step in range(1, args.warmup + args.steps + 1):
            dt = 10.0 if step <= args.warmup else seconds[side][repeat]
            t += dt
            records.append(
                {
                    "step": step,
                    "time": t,
                    "cpu": 1.5 * t,
                    "loss": 5.0 + step,
                    "step_seconds": dt / 2,
                    "mem_gib": 0.1,
                }
            )
        return {"records": records, "process_seconds": 1.0}

    return run_side


def test_bench_interleaves_and_takes_medians(monkeypatch, tmp_path):
    """A/B then B/A; warm-up steps left out; per-run, per-side medians and per-pair ratios as documented."""
    calls: list = []
    seconds = {"bigtrain": [1.0, 2.0, 0.5], "transformers": [1.0, 1.0, 1.0]}
    monkeypatch.setattr(bench, "run_side", _fake_run_side(calls, seconds))
    argv = ["--config", TINY, "--steps", "3", "--warmup", "2", "--work-dir", str(tmp_path)]
    args = bench.parse_args([*argv, "--repeats", "3"])
    args.json = str(tmp_path / "r.json")
    report = bench.run(args)
    assert calls == [(0, "bigtrain"), (0, "transformers"), (1, "transformers"), (1, "bigtrain"),
                     (2, "bigtrain"), (2, "transformers")]  # fmt: skip
    tokens = report["tokens_per_step"]
    b, hf = report["results"]["bigtrain"], report["results"]["transformers"]
    assert b["tokens_per_sec_per_repeat"] == [tokens / 1.0, tokens / 2.0, tokens / 0.5]
    assert b["tokens_per_sec"] == tokens / 1.0 and hf["tokens_per_sec"] == tokens / 1.0
    assert b["tokens_per_sec_in_step"] == 2 * tokens / 1.0
    assert b["tokens_per_cpu_sec"] == pytest.approx(tokens / 1.5)
    assert b["tokens_per_cpu_sec_per_repeat"] == pytest.approx([tokens / 1.5, tokens / 3.0, tokens / 0.75])
    assert report["ratio_per_repeat"] == [1.0, 0.5, 2.0] and report["ratio_tokens_per_sec"] == 1.0
    assert report["ratio_tokens_per_cpu_sec"] == pytest.approx(1.0)
    assert b["losses"] == [5.0 + s for s in range(1, 6)] and report["loss_rel_diff_max"] == 0.0
    assert json.loads((tmp_path / "r.json").read_text())["results"] == report["results"]
    assert report["work_dir"] == str(tmp_path)
    calls.clear()  # --no-reference: bigtrain alone, no ratios
    report = bench.run(bench.parse_args([*argv, "--repeats", "2", "--no-reference"]))
    assert calls == [(0, "bigtrain"), (1, "bigtrain")] and list(report["results"]) == ["bigtrain"]
    assert not any(k.startswith(("ratio", "loss_rel")) for k in report)


def test_run_figures_refuse_missing_or_untimeable_steps():
    records = [{"step": s, "time": float(s), "loss": 1.0, "step_seconds": 1.0} for s in (1, 2, 4)]
    with pytest.raises(ValueError, match="records for steps"):
        bench.run_figures(records, warmup=1, steps=3, tokens_per_step=8)
    assert bench.run_figures(records, warmup=1, steps=1, tokens_per_step=8)["tokens_per_cpu_sec"] is None
    same_ms = [{"step": s, "time": 1.0, "loss": 1.0, "step_seconds": 1e-4} for s in (1, 2)]
    with pytest.raises(ValueError, match="1 ms resolution"):
        bench.run_figures(same_ms, warmup=1, steps=1, tokens_per_step=8)
    with pytest.raises(SystemExit, match="--warmup must be >= 1"):
        bench.run(argparse.Namespace(warmup=0))


@pytest.mark.gpu
def test_bench_cuda_tiny_bf16_flash(tmp_path):
    report = _bench(
        tmp_path,
        "--set",
        "train.device=cuda",
        "precision=bf16",
        "model.hidden_size=256",
        "model.num_attention_heads=4",
        "model.seq_length=256",
        "--steps",
        "2",
        "--warmup",
        "2",
        "--repeats",
        "2",
        env=gpu_env(),
    )
    _check_report(report, device_cuda=True)
    assert report["sdpa"]["backend"] == "flash"
    assert report["peak_tflops"]  # H100/H200/A100 are in the table
    for r in report["results"].values():
        assert 0 < r["mfu"] < 1 and r["peak_mem_gib"] > 0


def test_sdpa_backend_is_profiled():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bigtrain.perf import attention_kernel, sdpa_backend

    q, kv = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    with sdpa_kernel(SDPBackend.MATH):
        assert sdpa_backend(q, kv, kv) == "math"
    assert sdpa_backend(q, kv, kv) in ("flash (cpu)", "math")
    cfg = load_config(TINY, ["precision=bf16"]).resolve(1)
    rng = torch.get_rng_state()
    assert attention_kernel(cfg, torch.device("cpu")) in ("flash (cpu)", "math")
    # only rank 0 probes: drawing random numbers would put its RNG (dropout masks) out of step
    assert torch.equal(torch.get_rng_state(), rng)


def test_deepspeed_accelerator_must_match_the_device(monkeypatch):
    """DeepSpeed chooses CUDA at import on a GPU machine: a CPU run there is refused with the fix named."""
    import deepspeed.accelerator

    from bigtrain.distributed import check_accelerator

    cfg = load_config(TINY).resolve(1)
    check_accelerator(cfg, torch.device("cpu"))  # here DeepSpeed's accelerator is the CPU one

    class Cuda:
        def device_name(self) -> str:
            return "cuda"

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Cuda())
    with pytest.raises(RuntimeError, match="set DS_ACCELERATOR=cpu"):
        check_accelerator(cfg, torch.device("cpu"))


def test_compile_regions_same_loss_and_grads(world_of_one, monkeypatch):  # noqa: F811
    """train.compile=true routes norm/rotary/SwiGLU/loss through torch.compile; results unchanged."""
    from bigtrain import perf
    from bigtrain.distributed import init_distributed
    from bigtrain.registry import build_model

    monkeypatch.setenv("BIGTRAIN_COMPILE_BACKEND", "aot_eager")  # graph capture without C++ codegen
    cfg = tiny_cfg()
    init_distributed(cfg)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=torch.Generator().manual_seed(1)
    )
    # dynamo's counters and caches are process-global: start from zero so only this test's graphs count
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    for on in (False, True):
        cfg.train.compile = on
        model = build_model(cfg)
        assert perf.compile_enabled() == on
        loss = model(tokens, tokens, torch.ones_like(tokens, dtype=torch.float))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        with torch.no_grad():  # inference stays eager (KV-cache shapes vary)
            model.outputs(tokens)
    perf.set_compile(False)
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 4  # norm, rotary, swiglu, loss


@pytest.mark.gpu
def test_batches_prefetched_in_pinned_memory_on_cuda():
    """The data iterator's background thread hands out pinned batches, so copies are asynchronous."""
    from bigtrain.data import batch_iterator

    class Items:
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict:
            return {
                "tokens": torch.zeros(4),
                "labels": torch.zeros(4),
                "loss_mask": torch.ones(4),
                "sample_id": i,
            }

    it = batch_iterator(Items(), 0, 2, 4, 0, 1)
    assert all(t.is_pinned() for t in next(it).values())
    it.close()


BENCH_CP = str(REPO / "tools" / "bench_context_attention.py")


def test_bench_context_attention_cp2_matches_one_process(tmp_path):
    """tools/bench_context_attention.py at a tiny size (2 gloo processes): every CP method that runs gives
    the one-process SDPA output and q/k/v gradients within 1e-5 (measured: Ulysses exact, ring ~2e-7),
    and is timed; torch's own SDPA dispatch of ring CP either fails on CPU (it handles only the CUDA
    kernels) or, once it runs, is held to the same tolerance."""
    from tools import bench_context_attention as cpa

    out = tmp_path / "cp.json"
    cmd = [sys.executable, BENCH_CP, "--seq", "64", "128", "--head-dim", "16", "--repeats", "2"]
    proc = run_cmd([*cmd, "--json", str(out)], timeout=600)
    report = json.loads(out.read_text())
    assert "| 128 | ring CP2 |" in proc.stdout, proc.stdout
    assert report["cp"] == 2 and report["config"]["kv_heads"] == 2 and report["config"]["heads"] == 8
    for seq in ("64", "128"):
        row = report["results"][seq]
        assert len(row["single"]["seconds"]) == 2 and row["single"]["speedup"] == 1.0
        ran = [m for m, r in row.items() if m != "single" and "error" not in r]
        assert set(cpa.METHODS) <= set(ran), row
        for method in ran:
            r = row[method]
            assert set(r["max_rel_error"]) == set(cpa.TENSORS)
            assert r["max_rel_error_max"] <= 1e-5, (seq, method, r["max_rel_error"])
            assert len(r["seconds"]) == 2 and r["median_s"] == statistics.median(r["seconds"]) > 0
            assert r["median_cpu_s"] == statistics.median(r["cpu_seconds"]) > 0
            assert r["speedup"] == pytest.approx(row["single"]["median_s"] / r["median_s"])
        if "error" in row["ring-dispatch"]:
            assert "_scaled_dot_product_flash_attention_for_cpu" in row["ring-dispatch"]["error"]


def test_bench_context_attention_error_measure_and_arguments():
    """The correctness column tells a wrong attention apart (a non-causal output against the causal
    reference), and shapes that CP2 cannot split are refused by name."""
    from tools import bench_context_attention as cpa

    args = cpa.parse_args(["--seq", "32", "--head-dim", "8"])
    q, k, v, dout = cpa.make_inputs(args, 32)
    ref = cpa.sdpa_fwd_bwd(q, k, v, dout)
    assert cpa.max_rel_error(ref["out"], ref["out"]) == 0.0
    wrong = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # no causal mask
    assert cpa.max_rel_error(wrong, ref["out"]) > 1e-2
    with pytest.raises(ValueError, match="shape"):
        cpa.max_rel_error(ref["dk"], ref["dq"])
    with pytest.raises(SystemExit):
        cpa.parse_args(["--kv-heads", "3", "--heads", "9"])
    with pytest.raises(SystemExit):
        cpa.parse_args(["--seq", "30"])


def test_bench_long_context_figures_and_budget(monkeypatch, tmp_path):
    """tools/bench_long_context.py: layouts interleaved per length, figures against TP2 at the same
    length, activation growth over the shortest length, and lengths past --budget-s dropped."""
    from tools import bench_long_context as blc

    calls: list = []
    clock = [0.0]
    peak = {"tp2": 1.0, "tp2-sp": 0.5, "cp2": 0.5}  # GiB of growth per 1k tokens

    def run_one(args, layout, seq):
        calls.append((layout, seq))
        clock[0] += seq / 1024 * 10  # each run takes 10 s per 1k tokens
        step = {"tp2": 1.0, "tp2-sp": 1.2, "cp2": 0.8}[layout] * seq / 1024
        return {
            "loss_step1": 6.0 + (1e-7 if layout == "cp2" else 0.0),
            "step_seconds": [step, step, step],
            "median_step_s": step,
            "peak_rss_gib": 0.4 + peak[layout] * seq / 1024,
            "run_seconds": 10.0,
        }

    monkeypatch.setattr(blc, "run_one", run_one)
    monkeypatch.setattr(blc, "_now", lambda: clock[0])
    args = blc.parse_args(["--seq", "2048", "1024", "4096", "8192", "--budget-s", "200"])
    report = blc.run(args)
    # 1k: 30 s, 2k: 60 s (90 s total), 4k: predicted 2 x 60 -> 210 s > 200: 4k and 8k dropped
    assert calls == [(lay, s) for s in (1024, 2048) for lay in ("tp2", "tp2-sp", "cp2")]
    assert report["dropped_seq"] == [4096, 8192] and list(report["results"]) == ["1024", "2048"]
    row = report["results"]["2048"]
    assert row["tp2"]["step_time_vs_tp2"] == 1.0 and row["cp2"]["step_time_vs_tp2"] == pytest.approx(0.8)
    assert row["tp2-sp"]["activation_delta_gib"] == pytest.approx(0.5)
    assert row["cp2"]["activation_tp2_over_this"] == pytest.approx(2.0)
    assert row["cp2"]["loss_rel_diff_vs_tp2"] == pytest.approx(1e-7 / 6.0)
    assert "activation_tp2_over_this" not in report["results"]["1024"]["cp2"]  # no growth at the shortest
    table = blc.format_table(report)
    assert "| 2048 | cp2 | 1.600 | 0.80 |" in table and "dropped (over --budget-s): [4096, 8192]" in table
