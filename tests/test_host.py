"""Results must not depend on the host's processor. A precision the host's DeepSpeed accelerator cannot
train in is refused before start-up, naming the field and what runs instead (issue 12 §0: on an AMD
EPYC, DeepSpeed's CPU accelerator has no fp16 and the run died after start-up with ``ValueError: Type
fp16 is not supported on your device``). The fp16 training path itself is exercised here on every host
(``tests.host_capability`` forces the capability); the full fp16 tests run where the host has it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bigtrain.config import ConfigError, load_config
from bigtrain.distributed import check_precision, precision_supported
from tests.conftest import REPO
from tests.training.helpers import TINY, metrics, single, train_args, write_corpus


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
    out = single(["fp16=off", module, *args], module="tests.host_capability", check=False, timeout=180)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("bigtrain: config error:")]
    assert lines == [
        "bigtrain: config error: precision: fp16 is not supported by DeepSpeed's cpu accelerator on this "
        f"host ({lines[0].split('host (')[1].split(')')[0]}); use precision=bf16 or precision=fp32"
    ], out.stderr[-3000:]
    assert not (tmp_path / "config.yaml").exists()  # nothing started


@pytest.mark.slow
def test_fp16_training_path_runs_on_every_host(tmp_path):
    """Dynamic loss scaling on the fp16 path (fp16 ZeRO-0 run as ZeRO-1), with the capability forced:
    an overflow is skipped and logged, the scale halves, training goes on and learns, the checkpoint
    holds true fp32 masters."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    run = tmp_path / "run"
    args = train_args(
        corpus,
        run,
        "precision=fp16",
        "fp16.hysteresis=1",
        "debug.inject_spike_at_step=3",
        "debug.spike_factor=1.0e+20",
        "checkpoint.interval=6",
        steps=6,
    )
    out = single(["fp16=on", "bigtrain.pretrain", *args], module="tests.host_capability", timeout=300)
    assert "step 3: fp16 overflow, update skipped by dynamic loss scaling" in out.stdout
    rows = {r["step"]: r for r in metrics(run)}
    assert rows[3]["skipped"] and not any(rows[s].get("skipped") for s in (1, 2, 4, 5, 6))
    assert rows[4]["loss_scale"] == rows[2]["loss_scale"] / 2
    assert rows[6]["loss"] < rows[1]["loss"] - 0.1, [rows[s]["loss"] for s in sorted(rows)]
    (ckpt,) = (run / "checkpoints").glob("step_*")
    assert json.loads((ckpt / "bigtrain.json").read_text())["step"] == 6
    masters = [t for f in (ckpt / "weights").glob("*.safetensors") for t in load_file(str(f)).values()]
    assert masters and any((t != t.half().float()).any() for t in masters)  # fp32, not fp16 copies
