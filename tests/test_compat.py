"""bigtrain.compat: the version guard, each framework patch's logic (without a process group where the
patch allows), and the module's patch table (every row names a test that exists)."""

from __future__ import annotations

import io
import math
import re
import types
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from bigtrain import compat
from tests.conftest import REPO
from tests.models.test_layout import tiny_cfg, world_of_one  # noqa: F401  (fixture)

# ---------------------------------------------------------------------------- the patch table
ROW = re.compile(r"^\s{4}(\w+)\s+\|\s+(.+?)\s+\|\s+(tests/\S+\.py)::(\w+)\s*$")


def patch_table() -> list[tuple[str, str, str]]:
    """(patch, test file, test name) for every row of compat's module docstring table."""
    rows = [ROW.match(line) for line in compat.__doc__.splitlines()]
    return [(m[1], m[3], m[4]) for m in rows if m]


def test_patch_table_names_an_existing_test_for_every_patch():
    rows = patch_table()
    assert len(rows) == 16, rows
    for name, path, test in rows:
        patch = getattr(compat, name)  # the row names a real patch ...
        source = (REPO / path).read_text()
        assert re.search(rf"^def {test}\(", source, re.M), f"{name}: {path}::{test} does not exist"
        doc = patch.__doc__
        # ... whose docstring agrees with the table and says what it was checked against
        assert f"Fails without it: {path}::{test}" in " ".join(doc.split()), name
        assert "Checked: deepspeed 0.19.8, megatron-core 0.16.1, torch 2.13.0." in doc, name
    # and every patch in the module is in the table
    documented = {
        n for n, obj in vars(compat).items() if "Fails without it:" in (getattr(obj, "__doc__", None) or "")
    }
    assert documented == {name for name, _, _ in rows}


# ---------------------------------------------------------------------------- version guard
def fake_versions(monkeypatch, **versions: str) -> None:
    installed = {"deepspeed": "0.19.8", "megatron-core": "0.16.1"}
    installed.update({k.replace("_", "-"): v for k, v in versions.items()})
    monkeypatch.setattr(compat.metadata, "version", lambda name: installed[name])


def test_check_versions_accepts_the_installed_and_any_patch_release(monkeypatch):
    compat.check_versions()  # this environment
    fake_versions(monkeypatch, deepspeed="0.19.11", megatron_core="0.16.0rc2")
    compat.check_versions()


@pytest.mark.parametrize(
    "versions, named",
    [
        ({"deepspeed": "0.20.0"}, ["deepspeed 0.20.0 (needs 0.19.x)"]),
        ({"deepspeed": "0.18.9"}, ["deepspeed 0.18.9 (needs 0.19.x)"]),
        ({"megatron_core": "0.17.0"}, ["megatron-core 0.17.0 (needs 0.16.x)"]),
        (
            {"deepspeed": "1.19.0", "megatron_core": "0.1.16"},
            ["deepspeed 1.19.0 (needs 0.19.x)", "megatron-core 0.1.16 (needs 0.16.x)"],
        ),
    ],
)
def test_check_versions_names_installed_and_required(monkeypatch, versions, named):
    fake_versions(monkeypatch, **versions)
    with pytest.raises(compat.VersionMismatch) as e:
        compat.check_versions()
    for text in named:
        assert text in str(e.value)
    assert "bigtrain/compat.py" in str(e.value)


def test_init_distributed_checks_versions_before_anything_else(monkeypatch):
    from bigtrain.distributed import init_distributed

    fake_versions(monkeypatch, deepspeed="0.20.0")
    with pytest.raises(compat.VersionMismatch, match="deepspeed 0.20.0"):
        init_distributed(tiny_cfg())
    assert not torch.distributed.is_initialized()


def test_setup_pins_the_minors_the_patches_target():
    setup = (REPO / "setup.py").read_text()
    for name, minor in compat.TARGET_VERSIONS.items():
        major, m = map(int, minor.split("."))
        pin = re.search(rf'"{name}>=([\d.]+),<([\d.]+)"', setup)
        assert pin, name
        low, high = pin[1], pin[2]
        assert low.startswith(f"{minor}") and high == f"{major}.{m + 1}", (name, low, high)
    assert '"deepspeed>=0.19.8,<0.20"' in setup


# ---------------------------------------------------------------------------- patches, no process group
def saved_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def test_compact_views_clones_only_views_of_larger_storages():
    flat = torch.arange(1000, dtype=torch.float32)
    view, whole, small = flat[10:20], torch.ones(4), torch.arange(6.0).view(2, 3)
    state = {"state": {0: {"exp_avg": view, "step": 3}}, "groups": [whole, (view, small)], "n": 1}
    compacted = compat.compact_views(state)
    exp_avg = compacted["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, view) and exp_avg.untyped_storage().nbytes() == 40
    assert exp_avg.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    assert compacted["groups"][0] is whole and compacted["groups"][1][1] is small  # not copied
    assert isinstance(compacted["groups"][1], tuple) and compacted["state"][0]["step"] == 3
    assert compacted["n"] == 1
    assert saved_bytes(compacted) < saved_bytes(state) - 3000  # the 1000-float storage is not written


def test_compact_optimizer_state_dict_wraps_the_method():
    flat = torch.zeros(1000)
    opt = types.SimpleNamespace(state_dict=lambda: {"master": flat[:10]})
    opt.state_dict.__doc__ = "DeepSpeed's"
    compat.compact_optimizer_state_dict(opt)
    assert opt.state_dict()["master"].untyped_storage().nbytes() == 40
    assert opt.state_dict.__doc__ == "DeepSpeed's"


def test_guard_torch_optimizer_step_skips_while_overflow_is_set():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 1.0
    )  # wraps opt.step first (as DeepSpeed)
    compat.guard_torch_optimizer_step(opt)
    assert opt.overflow is False
    p.grad = torch.ones(3)
    opt.overflow = True
    before = p.detach().clone()
    opt.step()  # the engine then leaves the LR schedule alone
    assert torch.equal(p, before) and not opt.state  # bitwise unchanged, no moments created
    opt.overflow = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler still sees the step: no "step() order" warning
        opt.step()
        scheduler.step()
    assert not torch.equal(p, before)
    other = types.SimpleNamespace(step=lambda: None)  # DeepSpeed's own optimizers: untouched
    compat.guard_torch_optimizer_step(other)
    assert not hasattr(other, "overflow")


def test_share_fp32_master_partitions_points_zero3_masters_at_the_parameters():
    param = torch.arange(8.0)
    master = param.clone()
    flat = torch.zeros(1000)
    opt = types.SimpleNamespace(
        fp32_partitioned_groups_flat=[master],
        fp16_partitioned_groups_flat=[param],
        state_dict=lambda: {"fp32": flat[:8]},
    )
    compat.share_fp32_master_partitions(types.SimpleNamespace(optimizer=opt))
    assert master.data_ptr() == param.data_ptr()
    assert opt.state_dict()["fp32"].untyped_storage().nbytes() == 32  # compaction follows sharing
    offloaded = types.SimpleNamespace(
        fp32_partitioned_groups_flat=[param.clone()],
        fp16_partitioned_groups_flat=[param],
        offload_optimizer=True,
    )
    compat.share_fp32_master_partitions(types.SimpleNamespace(optimizer=offloaded))
    assert offloaded.fp32_partitioned_groups_flat[0].data_ptr() != param.data_ptr()
    differs = types.SimpleNamespace(
        fp32_partitioned_groups_flat=[param + 1], fp16_partitioned_groups_flat=[param]
    )
    compat.share_fp32_master_partitions(types.SimpleNamespace(optimizer=differs))
    assert differs.fp32_partitioned_groups_flat[0].data_ptr() != param.data_ptr()


def test_identity_allreduce_is_skipped_at_one_data_parallel_rank():
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    def allreduce_after(optimizer, dp: int, pp: int) -> bool:
        engine = types.SimpleNamespace(optimizer=optimizer, enable_backward_allreduce=True)
        compat.skip_identity_allreduce(engine, dp, pp)
        return engine.enable_backward_allreduce

    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    bf16 = BF16_Optimizer.__new__(BF16_Optimizer)  # type checks only: no process group needed
    zero = ZeROOptimizer.__new__(ZeROOptimizer)
    assert allreduce_after(torch_opt, 1, 1) is False
    assert allreduce_after(bf16, 1, 1) is False
    assert allreduce_after(zero, 1, 1) is True  # ZeRO-1/2 move gradients into partitions there
    assert allreduce_after(torch_opt, 2, 1) is True
    assert allreduce_after(torch_opt, 1, 2) is True


def test_engine_file_recorder_records_and_restores():
    calls, written = [], []
    engine = types.SimpleNamespace(checkpoint_engine=types.SimpleNamespace())
    original = engine.checkpoint_engine.save = lambda state, path: calls.append(path) or "ok"
    recorder = compat.EngineFileRecorder(engine, written.append)
    assert engine.checkpoint_engine.save("s", "/x/a.pt") == "ok"
    engine.checkpoint_engine.save("s", "/x/b.pt")
    assert recorder.close() == [Path("/x/a.pt"), Path("/x/b.pt")]
    assert calls == ["/x/a.pt", "/x/b.pt"] and written == [1, 2]
    assert engine.checkpoint_engine.save is original


def test_scheduler_last_lr_follows_the_restored_groups():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert scheduler.get_last_lr() == [0.5]
    opt.param_groups[0]["lr"] = 0.25  # what checkpoint._keep_configured puts back after a load
    compat.set_scheduler_last_lr(scheduler)
    assert scheduler.get_last_lr() == [0.25] and scheduler.state_dict()["_last_lr"] == [0.25]


def test_default_group_timeout_reaches_groups_created_later(monkeypatch):
    import torch.distributed.distributed_c10d as c10d

    # torch's default (an earlier init_distributed in this process moved it); both restored after the test
    monkeypatch.setattr(c10d, "default_pg_timeout", timedelta(minutes=30))
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)
    assert c10d._get_default_timeout(c10d.Backend.GLOO) == timedelta(minutes=30)
    compat.default_group_timeout(timedelta(seconds=42))
    assert c10d._get_default_timeout(c10d.Backend.GLOO) == timedelta(seconds=42)
    assert c10d.default_pg_nccl_timeout == timedelta(seconds=42)


def test_single_process_rank_answers_zero_only_without_a_group():
    assert not torch.distributed.is_initialized()
    original = torch.distributed.get_rank
    with compat.single_process_rank():
        assert torch.distributed.get_rank() == 0
    assert torch.distributed.get_rank is original
    with pytest.raises(ValueError, match="process group"):
        torch.distributed.get_rank()


def test_sample_dataset_uncaches_every_gpt_masks():
    from bigtrain.data.datasets import SampleDataset

    shards = [types.SimpleNamespace(masks_and_position_ids_are_cacheable=True) for _ in range(2)]
    SampleDataset(types.SimpleNamespace(datasets=shards), [0, 1], [], "train")
    assert [s.masks_and_position_ids_are_cacheable for s in shards] == [False, False]


# ---------------------------------------------------------------------------- patches on a real engine
def _engine(*overrides: str):
    from bigtrain.distributed import init_distributed
    from bigtrain.engine import initialize_engine
    from bigtrain.registry import build_model

    cfg = tiny_cfg("train.global_batch_size=2", *overrides)
    dist = init_distributed(cfg)
    return cfg, initialize_engine(cfg, build_model(cfg, topology=dist.topology), dist)


def _backward(cfg, engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m, b = cfg.model, cfg.train.micro_batch_size
    tokens = torch.randint(0, m.vocab_size, (b, m.seq_length + 1), generator=g)
    engine.backward(engine(tokens[:, :-1], tokens[:, 1:], torch.ones(b, m.seq_length)))


def test_fp32_grad_norm_is_recorded_and_a_nonfinite_one_skips_the_step(world_of_one):  # noqa: F811
    cfg, engine = _engine("optim.grad_clip=1.0e6")  # clipping on, never binding
    assert engine.enable_backward_allreduce is False  # skip_identity_allreduce applied at DP=1
    params = [p for p in engine.module.parameters() if p.requires_grad]
    _backward(cfg, engine, 0)
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    engine.step()
    assert engine.get_global_grad_norm() is not None
    assert float(engine.get_global_grad_norm()) == pytest.approx(expected, rel=1e-5)
    assert engine.skipped_steps == 0

    _backward(cfg, engine, 1)
    params[0].grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for p in params]
    engine.step()
    assert engine.optimizer.overflow is True and engine.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "a non-finite step moved parameters"
    assert float(engine.get_global_grad_norm()) == -1.0  # DeepSpeed's "not finite" norm


def test_fp32_masters_share_the_parameter_partition_under_zero1(world_of_one):  # noqa: F811
    _, engine = _engine("zero.stage=1")
    opt = engine.optimizer
    for i, master in enumerate(opt.single_partition_of_fp32_groups):
        assert master.data_ptr() == opt.parallel_partitioned_bit16_groups[i][0].data_ptr()
    assert engine.enable_backward_allreduce is True  # ZeRO-1 keeps DeepSpeed's reduction path
    assert hasattr(opt.state_dict, "__wrapped__")  # compact_optimizer_state_dict followed the sharing
