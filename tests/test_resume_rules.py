"""bigtrain.resume_rules: every config field is classified, and each class does what the table says
(in-process, on saved metadata as checkpoint.save_checkpoint writes it)."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch

from bigtrain.config import Config, ConfigError, load_config
from bigtrain.data.validate import recorded_data
from bigtrain.resume_rules import FREE, HONOURED, REFUSED, RULES, leaves, reconcile
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"
CKPT = "runs/x/checkpoints/step_00000004"


def config(*overrides: str, world: int = 1) -> Config:
    return load_config(TINY, list(overrides)).resolve(world)


def meta(cfg: Config, step: int = 4) -> dict:
    """bigtrain.json of a checkpoint of ``cfg`` after ``step`` steps (no skipped batches)."""
    return {
        "step": step,
        "consumed_samples": step * cfg.train.global_batch_size,
        "config": cfg.to_dict(),
        "data": recorded_data(cfg.data),
    }


def test_every_config_field_is_classified():
    """A new config field fails here until RULES says what a resume does with it."""
    fields = set(leaves(Config()))
    assert fields - set(RULES) == set(), "config fields in no resume class"
    assert set(RULES) - fields == set(), "resume rules for fields that do not exist"
    assert {r.kind for r in RULES.values()} == {FREE, HONOURED, REFUSED}
    assert all(r.why for r in RULES.values())


def test_honoured_changes_are_said_per_field_from_the_next_step():
    saved = config("optim.lr=1e-3", "optim.beta2=0.95", "optim.grad_clip=1.0")
    new = config("optim.lr=1e-4", "optim.beta2=0.99", "optim.grad_clip=0.5", "train.log_interval=5")
    lines = reconcile(new, meta(saved, step=2), CKPT)
    assert lines == [
        "optim.lr: 0.001 → 0.0001 from step 3",
        "optim.beta2: 0.95 → 0.99 from step 3",
        "optim.grad_clip: 1.0 → 0.5 from step 3",
    ]  # train.log_interval is free: no line
    same = config()
    assert reconcile(same, meta(config()), CKPT) == []


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.seed=7"], "train.seed: checkpoint 1234 vs config 7"),
        (["optim.name=sgd"], "optim.name: checkpoint adamw vs config sgd"),
        (["precision=bf16"], "precision: checkpoint fp32 vs config bf16"),
        (["model.seq_length=64"], "model.seq_length: checkpoint 32 vs config 64"),
        (["model.ffn_hidden_size=256"], "model.ffn_hidden_size: checkpoint 128 vs config 256"),
        (["data.mock=false", "data.train=/data/other"], "data.train: checkpoint null vs config /data/other"),
    ],
)
def test_refused_changes_name_field_values_and_remedy(overrides, needle):
    with pytest.raises(ConfigError) as err:
        reconcile(config(*overrides), meta(config()), CKPT)
    message = str(err.value)
    assert message.startswith(f"resuming from {CKPT}: ") and "\n" not in message
    assert needle in message
    assert "to resume, or start a new train.run_dir from its weights with checkpoint.load=" + CKPT in message


def test_conditional_rules():
    # fp16 scaling fields: free unless both runs are fp16, honoured then
    assert reconcile(config("fp16.loss_scale_window=10"), meta(config()), CKPT) == []
    fp16 = config("precision=fp16")
    assert reconcile(config("precision=fp16", "fp16.initial_scale_power=8"), meta(fp16), CKPT) == [
        "fp16.initial_scale_power: 16 → 8 from step 5"
    ]
    # momentum is honoured only where the optimizer has one
    assert reconcile(config("optim.momentum=0.5"), meta(config()), CKPT) == []
    sgd = config("optim.name=sgd")
    assert reconcile(config("optim.name=sgd", "optim.momentum=0.5"), meta(sgd), CKPT) == [
        "optim.momentum: 0.9 → 0.5 from step 5"
    ]
    # data.valid: another validation corpus is free; switching between a split and a corpus is not
    split = config("data.mock=false", "data.train=/d/a")
    with pytest.raises(ConfigError, match="data.valid: checkpoint null vs config /d/b"):
        reconcile(config("data.mock=false", "data.train=/d/a", "data.valid=/d/b"), meta(split), CKPT)
    with_valid = config("data.mock=false", "data.train=/d/a", "data.valid=/d/b")
    assert (
        reconcile(config("data.mock=false", "data.train=/d/a", "data.valid=/d/c"), meta(with_valid), CKPT)
        == []
    )


def test_layout_changes_are_honoured_when_the_optimizer_state_can_be_resharded():
    """Adam's state is resharded (bigtrain.reshard_inject) to another data-parallel size, tensor or pipeline
    size, ZeRO stage or offload: honoured, said in one line each. Another optimizer's state cannot be:
    refused with the reason and the remedy."""
    for saved_overrides in (["zero.stage=1"], ["zero.stage=3"], ["precision=bf16"], []):
        saved = config(*saved_overrides, world=2)
        assert reconcile(config(*saved_overrides, world=1), meta(saved), CKPT) == [
            "derived.data_parallel_size: 2 → 1 from step 5"
        ]
    assert reconcile(config(world=2), meta(config("parallel.tensor=2", world=2)), CKPT) == [
        "parallel.tensor: 2 → 1 from step 5",
        "derived.data_parallel_size: 1 → 2 from step 5",
    ]
    assert reconcile(config("zero.stage=1"), meta(config("zero.stage=3")), CKPT) == [
        "zero.stage: 3 → 1 from step 5"
    ]
    sgd = ["optim.name=sgd", "zero.stage=1"]
    with pytest.raises(ConfigError) as err:
        reconcile(config(*sgd, world=1), meta(config(*sgd, world=2)), CKPT)
    assert "data-parallel size: checkpoint 2 vs config 1" in str(err.value)
    assert "the saved optimizer state cannot be resharded: optim.name=sgd: only Adam's state" in str(
        err.value
    )
    assert "relaunch with world size 2" in str(err.value)
    # a pipeline's partition: honoured within a pipeline, meaningless without one
    pp2 = ["parallel.pipeline=2", "parallel.partition_method=uniform"]
    assert reconcile(config("parallel.pipeline=2", world=2), meta(config(*pp2, world=2)), CKPT) == [
        "parallel.partition_method: uniform → parameters from step 5"
    ]
    assert reconcile(config(world=2), meta(config(*pp2, world=2)), CKPT) == [
        "parallel.pipeline: 2 → 1 from step 5",
        "derived.data_parallel_size: 1 → 2 from step 5",
    ]
    assert reconcile(config("model.make_vocab_size_divisible_by=64"), meta(config()), CKPT) == [
        "model.make_vocab_size_divisible_by: 128 → 64 from step 5"
    ]
    with pytest.raises(ConfigError, match="zero.stage: checkpoint 1 vs config 2"):
        reconcile(config("optim.name=sgd", "zero.stage=2"), meta(config(*sgd)), CKPT)
    with pytest.raises(ConfigError, match="parallel.tensor: checkpoint 2 vs config 1"):
        reconcile(
            config("optim.name=sgd", world=2),
            meta(config("optim.name=sgd", "parallel.tensor=2", world=2)),
            CKPT,
        )


class Orders:
    """A stand-in for megatron's order comparison (``reconcile``'s ``order_change``): answers ``first``
    and records what it was asked."""

    def __init__(self, first: int | None):
        self.first, self.asked = first, []

    def __call__(self, cfg: Config, saved: int, new: int, n: int) -> int | None:
        self.asked.append((saved, new, n))
        return self.first


def test_data_order_of_the_saved_run():
    """Unset data.train_samples: megatron's shuffle stays the one the saved run was built for. Raising
    train.steps past it (the issue's 4 -> 8) is honoured where megatron's order for the new count keeps
    the saved run's whole order, refused naming the fields where it does not; fewer steps keep the order."""
    four = config("train.steps=4")
    changed = Orders(first=3)
    with pytest.raises(ConfigError) as err:
        reconcile(config("train.steps=8"), meta(four), CKPT, changed)
    assert changed.asked == [(32, 64, 32)]  # the saved run's 32 samples, in the orders for 32 and 64
    message = str(err.value)
    assert "train.steps: checkpoint 4 vs config 8 needs 64 training samples" in message
    assert "built for 32" in message and "differs from it at sample 3" in message
    assert "keep train.steps <= 4" in message
    assert "data.train_samples=64" in message and f"checkpoint.load={CKPT}" in message
    # another of the kind: a larger global batch needs more samples too (a fresh run would build 5 x 16)
    with pytest.raises(ConfigError, match="needs 48 training samples.*data.train_samples=80"):
        reconcile(
            config("train.steps=5", "train.global_batch_size=16"),
            meta(config("train.steps=5")),
            CKPT,
            changed,
        )

    kept = Orders(first=None)
    eight = config("train.steps=8")
    assert reconcile(eight, meta(four), CKPT, kept) == [
        "train.steps: 4 → 8 from step 5 (data order of the saved run kept: its first 32 samples are "
        "unchanged; data.train_samples 32 → 64)"
    ]
    assert eight.data.train_samples == 64  # what config.yaml and the next checkpoints record
    wider = config("train.steps=5", "train.global_batch_size=16")
    assert reconcile(wider, meta(config("train.steps=5")), CKPT, kept) == [
        "train.global_batch_size: 8 → 16 from step 5 (data order of the saved run kept: its first 40 samples "
        "are unchanged; data.train_samples 40 → 80)"
    ]
    # a loss-spike rollback skipped samples past the saved count: they belong to the compared order
    skipped = {**meta(four), "consumed_samples": 40, "skipped_batches": [[24, 32], [40, 48]]}
    kept.asked.clear()
    reconcile(config("train.steps=8"), skipped, CKPT, kept)
    assert kept.asked == [(32, 72, 48)]

    six = config("train.steps=6")
    assert reconcile(six, meta(config("train.steps=8")), CKPT, changed) == [
        "train.steps: 8 → 6 from step 5",
        "data.train_samples: kept at 64, the saved run's data order",
    ]
    assert six.data.train_samples == 64  # what config.yaml and the next checkpoints record
    # an explicit new count is honoured, saying whether megatron's order for it keeps the saved one
    pinned = config("train.steps=8", "data.train_samples=64")
    assert reconcile(pinned, meta(four), CKPT, changed) == [
        "train.steps: 4 → 8 from step 5",
        "data.train_samples: 32 → 64 from step 5 (megatron's shuffle is rebuilt: a new data order from sample 3)",
    ]
    assert reconcile(config("train.steps=8", "data.train_samples=64"), meta(four), CKPT, kept)[1] == (
        "data.train_samples: 32 → 64 from step 5 (data order of the saved run kept: its first 32 samples are "
        "unchanged)"
    )
    with pytest.raises(ConfigError, match="raise data.train_samples to at least 64"):
        reconcile(config("train.steps=8", "data.train_samples=48"), meta(four), CKPT, kept)
    # a pinned count that covers the extension is no change at all for the data
    assert reconcile(config("train.steps=8", "data.train_samples=64"), meta(pinned), CKPT, changed) == []


def test_mock_data_keeps_its_order_for_more_steps():
    """data.mock: megatron's mock corpus holds millions of windows per epoch, so 4 -> 8 steps keeps its
    order; the real comparison (both orders built in memory, nothing cached) honours it."""
    from bigtrain.data import build_datasets

    eight = config("train.steps=8")
    assert eight.data.mock
    assert reconcile(eight, meta(config("train.steps=4")), CKPT) == [
        "train.steps: 4 → 8 from step 5 (data order of the saved run kept: its first 32 samples are "
        "unchanged; data.train_samples 32 → 64)"
    ]
    saved, extended = (build_datasets(config(f"train.steps={n}"))[0] for n in (4, 8))
    assert all(torch.equal(saved[i]["tokens"], extended[i]["tokens"]) for i in range(32))


def corpus(prefix, documents: int, seed: int = 0):
    """A corpus as tokenizer.preprocess leaves it: the files and a PREFIX.meta.json of this run."""
    from tests.training.helpers import write_corpus

    write_corpus(prefix, documents=documents, seed=seed)
    prefix.with_name(prefix.name + ".meta.json").write_text(json.dumps({"preprocess_id": uuid.uuid4().hex}))
    return prefix


def on(data: str, *overrides: str) -> Config:
    return config(
        "data.mock=false", f"data.train={data}", 'data.split="100,0,0"', "model.vocab_size=512", *overrides
    )


def test_data_files_are_compared_with_the_checkpoints(tmp_path, monkeypatch):
    """The issue's trial: a run on data/w (133 docs), then 60 other documents preprocessed to the same
    prefix. The checkpoint records each prefix's sizes and metadata digest; the same files by another
    path or with new mtimes (a copy) resume, other content under the same name is refused naming it."""
    monkeypatch.chdir(tmp_path)
    prefix = corpus(tmp_path / "data" / "w", documents=133)
    saved = meta(on("data/w"), step=2)
    assert saved["data"]["data.train"][0]["shards"][0][0] == str(prefix)
    for same in ("data/w", "./data/w", str(prefix), "data/../data/w"):
        assert reconcile(on(same), saved, CKPT) == [], same
    for ext in (".bin", ".idx", ".meta.json"):  # a copy: new mtimes, same content
        os.utime(f"{prefix}{ext}", ns=(1, 1))
    assert reconcile(on("./data/w"), saved, CKPT) == []

    corpus(prefix, documents=60, seed=1)  # re-preprocessed: other documents, same prefix
    with pytest.raises(ConfigError) as err:
        reconcile(on("data/w", "train.steps=3"), saved, CKPT)
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"resuming from {CKPT}: data.train: {prefix} is not the"
    )
    assert ".bin bytes" in message and "meta.json sha256" in message
    assert (
        "restore the files the checkpoint was trained on" in message and f"checkpoint.load={CKPT}" in message
    )
    assert "data order of the saved run kept" not in message

    # the same sizes, another preprocessing run (only its metadata digest tells): refused too
    corpus(prefix, documents=133)
    again = meta(on("data/w"), step=2)
    prefix.with_name("w.meta.json").write_text(json.dumps({"preprocess_id": uuid.uuid4().hex}))
    with pytest.raises(
        ConfigError, match=r"data\.train: .*/data/w is not the .*\(meta\.json sha256 \w+ → \w+\)"
    ):
        reconcile(on("data/w"), again, CKPT)


def test_data_identity_edges(tmp_path, monkeypatch):
    """Moved data with the same content resumes (said); validation files with other content are said,
    not refused; a checkpoint from before the record is accepted with a line; mock data has no files."""
    monkeypatch.chdir(tmp_path)
    corpus(tmp_path / "a" / "w", documents=20)
    valid = corpus(tmp_path / "v" / "w", documents=20)
    saved = meta(on("a/w", "data.valid=v/w"), step=2)
    os.rename(tmp_path / "a", tmp_path / "b")
    assert reconcile(on("b/w", "data.valid=v/w"), saved, CKPT) == [
        f"data.train: {tmp_path}/a/w → {tmp_path}/b/w (the same files: sizes and preprocessing run equal)"
    ]
    corpus(valid, documents=30, seed=2)
    moved, line = reconcile(on("b/w", "data.valid=v/w"), saved, CKPT)
    assert moved.startswith("data.train: ") and line.startswith(f"data.valid: {valid} is not the data")
    assert "idx bytes" in line and line.endswith("validation from step 3 uses the new files")
    old = {k: v for k, v in saved.items() if k != "data"}  # nothing proves b/w holds a/w's data: refused
    with pytest.raises(ConfigError, match="data.train: checkpoint a/w vs config b/w"):
        reconcile(on("b/w", "data.valid=v/w"), old, CKPT)
    os.rename(tmp_path / "b", tmp_path / "a")  # the same path, written another way: accepted, said
    assert reconcile(on("./a/w", "data.valid=v/w"), old, CKPT) == [
        f"data.train: not compared with the data the checkpoint was trained on ({CKPT} predates checkpoints "
        "recording their data's identity)"
    ]
    assert meta(config())["data"] == {} and reconcile(config(), meta(config()), CKPT) == []


def test_finetune_fields():
    base = ["finetune.task=sft", "finetune.train=x.jsonl", "data.tokenizer=tok"]
    saved = config(*base, "finetune.patience=2")
    assert reconcile(config(*base, "finetune.patience=4"), meta(saved), CKPT) == [
        "finetune.patience: 2 → 4 from step 5"
    ]
    assert reconcile(config(*base, "finetune.patience=2", "train.steps=40"), meta(saved), CKPT) == [
        "train.steps: 4 → 40 from step 5"  # fine-tuning data is ordered per epoch: no sample count
    ]
    with pytest.raises(ConfigError, match="finetune.lora.rank: checkpoint 0 vs config 8"):
        reconcile(config(*base, "finetune.patience=2", "finetune.lora.rank=8"), meta(saved), CKPT)


def test_restored_state_gets_the_configured_values():
    """checkpoint._keep_configured around a load that does what DeepSpeed's does (the saved param_groups,
    LambdaLR state with its pickled LRSchedule, clip and whole fp16 loss scaler come back): afterwards
    the optimizer, schedule, clip and scaler hold the new config's values at the restored step."""
    import copy
    from types import SimpleNamespace

    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from bigtrain.checkpoint import _keep_configured
    from bigtrain.engine import LRSchedule, build_optimizer

    def engine(cfg: Config):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        opt = build_optimizer(cfg, model, torch.device("cpu"))
        f = cfg.fp16
        scaler = DynamicLossScaler(
            2.0**f.initial_scale_power, f.loss_scale_window, f.min_loss_scale, f.hysteresis, False
        )
        wrapper = SimpleNamespace(clip_grad=cfg.optim.grad_clip, loss_scaler=scaler)
        return SimpleNamespace(
            lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(cfg)), optimizer=wrapper
        )

    old = config("precision=fp16", "train.steps=6")
    saved = engine(old)
    for _ in range(2):
        saved.lr_scheduler.optimizer.step()
        saved.lr_scheduler.step()
    saved.optimizer.loss_scaler.cur_scale = 1024.0  # where dynamic scaling had got to

    def resumed(*overrides: str):
        new = config("precision=fp16", "train.steps=6", *overrides)
        e = engine(new)
        restore = _keep_configured(e, new, old)
        e.lr_scheduler.optimizer.load_state_dict(saved.lr_scheduler.optimizer.state_dict())  # the load
        e.lr_scheduler.load_state_dict(saved.lr_scheduler.state_dict())
        e.optimizer.clip_grad, e.optimizer.loss_scaler = (
            old.optim.grad_clip,
            copy.deepcopy(saved.optimizer.loss_scaler),
        )
        return new, e, restore

    changed = ["optim.lr=1e-4", "optim.min_lr=1e-5", "optim.beta2=0.99", "optim.eps=1e-6", "optim.weight_decay=0.05",
               "optim.grad_clip=0.25", "fp16.loss_scale_window=10", "fp16.hysteresis=1", "fp16.min_loss_scale=2",
               "fp16.initial_scale_power=8"]  # fmt: skip
    new, e, restore = resumed(*changed)
    groups = e.lr_scheduler.optimizer.param_groups
    assert groups[0]["betas"] == (0.9, 0.95) and groups[0]["lr"] != 1e-4  # control: the load's values
    restore()
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6 for g in groups)
    schedule = LRSchedule(new)
    assert [g["lr"] for g in groups] == [schedule.lr_at(2)] * 2 and e.lr_scheduler.last_epoch == 2
    e.lr_scheduler.optimizer.step()
    e.lr_scheduler.step()
    assert [g["lr"] for g in groups] == pytest.approx([schedule.lr_at(3)] * 2, rel=1e-15)
    scaler = e.optimizer.loss_scaler
    assert e.optimizer.clip_grad == 0.25
    assert (scaler.scale_window, scaler.delayed_shift, scaler.cur_hysteresis, scaler.min_scale) == (
        10,
        1,
        1,
        2.0,
    )
    assert scaler.cur_scale == 2.0**8  # fp16.initial_scale_power changed: the scale restarts there

    _, e, restore = resumed()  # nothing changed: the saved scale and schedule continue
    restore()
    assert e.optimizer.loss_scaler.cur_scale == 1024.0
    assert (
        e.lr_scheduler.optimizer.param_groups[0]["lr"] == saved.lr_scheduler.optimizer.param_groups[0]["lr"]
    )


def test_blend_extension_is_decided_by_megatron_orders(tmp_path):
    """A blend of two corpora with validation split off (data.split): 4 -> 8 steps is honoured while both
    members hold the longer run within the epochs they had, and refused when a 12-document member needs
    another epoch (megatron reshuffles it). Either way the decision, and the first changed sample named,
    is what comparing the samples' tokens of the two builds gives."""
    import functools
    import re

    from bigtrain.data import build_datasets
    from tests.data.util import make_cfg, random_docs, write_dataset

    big = write_dataset(tmp_path / "big" / "big", random_docs(300, seed=1))
    other = write_dataset(tmp_path / "other" / "other", random_docs(200, seed=2))
    small = write_dataset(tmp_path / "small" / "small", random_docs(12, seed=3))
    for blend, kept in (([[0.6, big], [0.4, other]], True), ([[0.6, big], [0.4, small]], False)):
        cfg = functools.partial(make_cfg, blend, split="90,10,0")
        saved, extended = (build_datasets(cfg(steps=steps))[0] for steps in (4, 8))
        same = [torch.equal(saved[i]["tokens"], extended[i]["tokens"]) for i in range(32)]
        first_differing = next((i for i, equal in enumerate(same) if not equal), None)
        assert (first_differing is None) == kept, (blend, same)
        new = cfg(steps=8)
        if kept:
            (line,) = reconcile(new, meta(cfg(steps=4)), CKPT)
            assert line.startswith("train.steps: 4 → 8 from step 5 (data order of the saved run kept")
            assert new.data.train_samples == 64
        else:
            with pytest.raises(ConfigError) as err:
                reconcile(new, meta(cfg(steps=4)), CKPT)
            named = re.search(r"differs from it at sample (\d+)", str(err.value))
            assert named and int(named.group(1)) == first_differing, str(err.value)
