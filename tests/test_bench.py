"""tools/bench.py runs both systems and reports sane numbers; the GPU fast-path pieces work
(train.compile regions give the same loss and gradients, the SDPA kernel is detected by profiling)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bigtrain import flops
from bigtrain.config import load_config
from tests.conftest import REPO, cpu_env, gpu_env, run_cmd
from tests.models.test_layout import tiny_cfg, world_of_one  # noqa: F401  (fixture)

TINY = str(REPO / "configs" / "tiny.yaml")


def _bench(tmp_path, *extra: str, env: dict | None = None) -> dict:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "--config", TINY, "--json", str(out), *extra]
    proc = run_cmd(cmd, env=env or cpu_env(), timeout=300)
    assert "bigtrain / reference tokens/s" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


def _check_report(report: dict, device_cuda: bool) -> None:
    cfg = load_config(TINY).resolve(1)
    assert report["tokens_per_step"] == cfg.train.global_batch_size * cfg.model.seq_length
    assert report["model_flops_per_token"] == flops.train_flops_per_token(
        cfg.model, cfg.derived.padded_vocab_size
    )
    assert report["parameters"] == flops.num_parameters(cfg.model, cfg.derived.padded_vocab_size)
    for name in ("bigtrain", "reference"):
        r = report["results"][name]
        assert len(r["tokens_per_sec_per_repeat"]) == report["repeats"]
        assert all(t > 0 for t in r["tokens_per_sec_per_repeat"])
        assert r["model_tflops"] == pytest.approx(
            r["tokens_per_sec"] * report["model_flops_per_token"] / 1e12
        )
        # both trained the same random-token batches from similar inits: losses near ln(vocab)
        assert abs(r["final_loss"] - torch.log(torch.tensor(float(cfg.model.vocab_size))).item()) < 1.0
        assert r["state_gib"] > 0
        assert ("peak_allocated_gib" in r) == device_cuda
    assert report["ratio_tokens_per_sec"] == pytest.approx(
        report["results"]["bigtrain"]["tokens_per_sec"] / report["results"]["reference"]["tokens_per_sec"]
    )
    assert report["versions"]["deepspeed"][0].isdigit() and report["versions"]["torch"]


def test_bench_cpu_tiny_writes_sane_json(tmp_path):
    report = _bench(tmp_path, "--steps", "1", "--warmup", "1", "--repeats", "2")
    _check_report(report, device_cuda=False)
    assert report["peak_tflops"] is None and "mfu" not in report["results"]["bigtrain"]
    assert report["sdpa"]["backend"] in ("flash (cpu)", "math")
    # fp32 states, DeepSpeed ZeRO-0 vs torch AdamW: both hold params + grads/none + 2 moments
    b, ref = report["results"]["bigtrain"]["state_gib"], report["results"]["reference"]["state_gib"]
    assert 0.5 < b / ref < 2.0


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
    assert report["sdpa"]["backend"] == "flash"
    assert report["peak_tflops"]  # H100/H200/A100 are in the table
    for r in report["results"].values():
        assert 0 < r["mfu"] < 1 and r["peak_allocated_gib"] > 0


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
    from bigtrain.models.parallelize import build_model

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
            model.logits(tokens)
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
