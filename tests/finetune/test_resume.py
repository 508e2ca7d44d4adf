"""A relaunched fine-tuning run is compared with its checkpoint like pretraining (same pre-flight and
resume): fine-tuning fields are refused or honoured per bigtrain.resume_rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigtrain.config import load_config
from bigtrain.engine import LRSchedule
from tests.finetune.helpers import SFT_TINY, reverse_rows, reverse_split, write_jsonl
from tests.training.helpers import metrics, single

pytestmark = pytest.mark.timeout(420)
MODULE = "bigtrain.finetune"


def test_relaunch_refuses_and_honours_finetune_fields(tok_dir: Path, tmp_path: Path):
    train, valid = reverse_split(40, 8)
    write_jsonl(tmp_path / "train.jsonl", reverse_rows(train))
    write_jsonl(tmp_path / "valid.jsonl", reverse_rows(valid))
    run_dir = tmp_path / "run"
    common = ["--config", SFT_TINY, "--set", f"data.tokenizer={tok_dir}", f"finetune.train={tmp_path / 'train.jsonl'}",
              f"finetune.valid={tmp_path / 'valid.jsonl'}", f"train.run_dir={run_dir}", "train.log_interval=1",
              "optim.warmup_steps=0"]  # fmt: skip
    single([*common, "train.steps=2", "finetune.patience=2"], module=MODULE)

    # the adapters' shape and the packed sequences behind the data position: refused, both named
    out = single([*common, "train.steps=4", "finetune.lora.rank=4", "finetune.packing=false"], module=MODULE,
                 check=False)  # fmt: skip
    assert out.returncode == 2 and "step 3/" not in out.stdout, out.stderr[-3000:]
    line = next(x for x in out.stderr.splitlines() if x.startswith("bigtrain: config error"))
    assert "finetune.lora.rank: checkpoint 0 vs config 4" in line
    assert "finetune.packing: checkpoint true vs config false" in line and "checkpoint.load=" in line

    # patience, the peak LR and the length: honoured, said, and the LR is the new schedule's
    new = [*common, "train.steps=4", "finetune.patience=3", "optim.lr=1e-3"]
    out = single(new, module=MODULE)
    for change in ("finetune.patience: 2 → 3", "optim.lr: 0.003 → 0.001", "train.steps: 2 → 4"):
        assert f"{change} from step 3" in out.stdout, change
    schedule = LRSchedule(load_config(SFT_TINY, new[3:]))
    resumed = [r for r in metrics(run_dir) if r["step"] > 2]
    assert [r["lr"] for r in resumed] == pytest.approx([schedule.lr_at(2), schedule.lr_at(3)], rel=1e-12)
