"""Results must not depend on the host's processor. A precision the host's DeepSpeed accelerator cannot
train in is refused before start-up, naming the field and what runs instead (issue 12 §0: on an AMD
EPYC, DeepSpeed's CPU accelerator has no fp16 and the run died after start-up with ``ValueError: Type
fp16 is not supported on your device``). The fp16 training path itself is exercised here on every host
(``tests.entry_point --fp16=on`` forces the capability); the full fp16 tests run where the host has it."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.config import ConfigError, load_config
from bigtrain.distributed import check_precision, precision_supported
from tests.conftest import REPO
from tests.training.helpers import (
    TINY,
    assert_refused_before_start_up,
    metrics,
    single,
    train_args,
    write_corpus,
)


class FakeAccelerator:
    def __init__(self, device: str, fp16: bool, bf16: bool):
        self.device, self.fp16, self.bf16 = device, fp16, bf16

    def device_name(self) -> str:
        return self.device

    def is_fp16_supported(self) -> bool:
        return self.fp16

    def is_bf16_supported(self) -> bool:
        return self.bf16


def use_accelerator(monkeypatch, **kw) -> None:
    fake = FakeAccelerator(**kw)
    monkeypatch.setattr("deepspeed.accelerator.get_accelerator", lambda: fake)


def test_fp16_on_a_cpu_without_it_is_refused_naming_the_field_and_the_alternatives(monkeypatch):
    use_accelerator(monkeypatch, device="cpu", fp16=False, bf16=True)
    with pytest.raises(ConfigError) as e:
        check_precision(load_config(TINY, ["precision=fp16"]))
    message = str(e.value)
    assert message.startswith("precision: fp16 is not supported by DeepSpeed's cpu accelerator on this host")
    assert message.endswith("use precision=bf16 or precision=fp32")
    for ok in ("bf16", "fp32"):
        check_precision(load_config(TINY, [f"precision={ok}"]))  # no error


def test_bf16_on_a_device_without_it_offers_what_the_device_has(monkeypatch):
    # the same kind on another device: a pre-Ampere GPU (CUDA accelerator) has fp16 but no bf16
    use_accelerator(monkeypatch, device="cpu", fp16=True, bf16=False)
    with pytest.raises(ConfigError, match=r"^precision: bf16 .* use precision=fp16 or precision=fp32$"):
        check_precision(load_config(TINY, ["precision=bf16"]))
    assert precision_supported("fp32", torch.device("cpu"))


def test_an_accelerator_for_another_device_is_not_asked(monkeypatch):
    # a CPU run whose DeepSpeed picked CUDA is check_accelerator's refusal (it names DS_ACCELERATOR)
    use_accelerator(monkeypatch, device="cuda", fp16=False, bf16=False)
    assert precision_supported("fp16", torch.device("cpu"))


@pytest.mark.parametrize(
    "module,extra",
    [
        ("bigtrain.pretrain", []),
        ("bigtrain.finetune", ["--config", str(REPO / "configs" / "sft-tiny.yaml")]),
        ("bigtrain.evaluate", ["--data", "unused"]),
    ],
    ids=["pretrain", "finetune", "evaluate"],
)
def test_every_entry_point_refuses_before_start_up(module, extra, tmp_path):
    args = ["--config", TINY, *extra, "--set", "precision=fp16", f"train.run_dir={tmp_path}"]
    out = single(
        ["--fp16=off", "--no-start-up", module, *args], module="tests.entry_point", check=False, timeout=180
    )
    assert_refused_before_start_up(out)
    lines = [line for line in out.stderr.splitlines() if line.startswith("bigtrain: config error:")]
    assert len(lines) == 1 and re.fullmatch(
        r"bigtrain: config error: precision: fp16 is not supported by DeepSpeed's cpu accelerator on "
        r"this host \(.+\); use precision=bf16 or precision=fp32",
        lines[0],
    ), out.stderr[-3000:]
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.slow
def test_fp16_training_path_runs_on_every_host(tmp_path):
    """Dynamic loss scaling on the fp16 path (fp16 ZeRO-0 run as ZeRO-1), with the capability forced:
    an overflow is skipped and logged, the scale halves, training goes on and learns, the checkpoint
    holds true fp32 masters, and a run killed after it resumes with the halved scale and the same
    losses (the fp16 tests' logic, which skip where the host has no fp16)."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    full, split = tmp_path / "full", tmp_path / "split"
    common = [
        "precision=fp16",
        "fp16.hysteresis=1",  # the first overflow halves the scale
        "debug.inject_spike_at_step=3",
        "debug.spike_factor=1.0e+20",  # a finite loss whose fp16 gradients overflow
        "checkpoint.interval=4",
    ]

    def fp16_run(run_dir, *extra, check=True):
        args = train_args(corpus, run_dir, *common, *extra, steps=6)
        return single(["--fp16=on", "bigtrain.pretrain", *args], module="tests.entry_point", check=check)

    out = fp16_run(full)
    assert "step 3: fp16 overflow, update skipped by dynamic loss scaling" in out.stdout
    rows = {r["step"]: r for r in metrics(full)}
    assert rows[3]["skipped"] and not any(rows[s].get("skipped") for s in (1, 2, 4, 5, 6))
    assert rows[4]["loss_scale"] == rows[2]["loss_scale"] / 2
    assert rows[6]["loss"] < rows[1]["loss"] - 0.1, [rows[s]["loss"] for s in sorted(rows)]
    ckpt = full / "checkpoints" / "step_00000004"
    masters = [t for f in (ckpt / "weights").glob("*.safetensors") for t in load_file(str(f)).values()]
    assert masters and any((t != t.half().float()).any() for t in masters)  # fp32, not fp16 copies

    crashed = fp16_run(split, "debug.crash_at_step=5", check=False)
    assert crashed.returncode != 0
    fp16_run(split)
    resumed = [r for r in metrics(split) if r["step"] > 4][-2:]  # the killed run may have logged step 5
    assert [r["step"] for r in resumed] == [5, 6]
    for r in resumed:
        assert r["loss_scale"] == rows[r["step"]]["loss_scale"]  # restored, not the initial scale
        assert abs(r["loss"] - rows[r["step"]]["loss"]) <= 1e-6 * abs(rows[r["step"]]["loss"])
