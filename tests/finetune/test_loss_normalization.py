"""The SFT loss of a step is the mean over every trained token of the global batch, whatever the micro-batch
size, gradient accumulation, data or pipeline parallelism and packing (issue 12 §3).

A global batch of 4 examples whose replies alternate 1 and 25 words (3 and 33 trained tokens) trains
for 3 steps at each layout; per-step training losses and the final validation loss must equal the
whole-batch run's (mbs=4) within 1e-5 relative. Each step trains all 4 examples (the data set is one
global batch), so packed sequences (2 examples each, global batch 2) train the same tokens as unpacked
ones. The wrong-on-purpose control runs mbs=1 x accumulation 4 with the old normalization (each
micro-batch's own mean, averaged) and must be told apart. A second data set of the same kind (chat
records: system prompts, two assistant turns in one conversation, replies of 2 to 30 words) is held to
the same equality at data parallel 2, and classification (example weights) at pipeline parallel 2."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from tests.finetune.helpers import CLASSIFY_TINY, LETTERS, SFT_TINY, classify_rows, write_jsonl
from tests.training.helpers import assert_close_rel, curve, losses, single, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODULE = "bigtrain.finetune"
CONTROL = "tests.training.per_micro_batch_mean"  # MODULE with the old, per-micro-batch normalization
TIMEOUT = 240  # per launched job
REL = 1e-5


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(LETTERS) for _ in range(n))


@pytest.fixture(scope="module")
def alternating(tmp_path_factory) -> tuple[Path, Path]:
    """(train, valid): 4 training examples whose replies alternate 1 and 25 words; 2 held out alike."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("loss_norm_data")

    def examples(n: int) -> list[dict]:
        return [{"prompt": words(rng, 3), "response": words(rng, 1 if i % 2 == 0 else 25)} for i in range(n)]

    return write_jsonl(root / "train.jsonl", examples(4)), write_jsonl(root / "valid.jsonl", examples(2))


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> tuple[Path, Path]:
    """The same kind of input in the messages format: uneven replies, a two-turn conversation."""
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("loss_norm_chat")

    def turn(role: str, n: int) -> dict:
        return {"role": role, "content": words(rng, n)}

    train = [
        {"messages": [turn("system", 2), turn("user", 3), turn("assistant", 30)]},
        {"messages": [turn("user", 2), turn("assistant", 2), turn("user", 2), turn("assistant", 9)]},
        {"messages": [turn("user", 4), turn("assistant", 2)]},
        {"messages": [turn("system", 1), turn("user", 2), turn("assistant", 17)]},
    ]
    valid = [{"messages": [turn("user", 3), turn("assistant", n)]} for n in (2, 20)]
    return write_jsonl(root / "train.jsonl", train), write_jsonl(root / "valid.jsonl", valid)


def args(tok_dir: Path, data: tuple[Path, Path], run_dir: Path, *overrides: str) -> list[str]:
    """3 steps of a global batch of 4 examples at a high constant rate (the loss moves every step)."""
    return ["--config", SFT_TINY, "--set", f"data.tokenizer={tok_dir}", f"finetune.train={data[0]}",
            f"finetune.valid={data[1]}", f"train.run_dir={run_dir}", "train.steps=3", "train.log_interval=1",
            "train.global_batch_size=4", "train.micro_batch_size=4", "finetune.packing=false",
            "optim.lr=0.01", "optim.warmup_steps=0", "optim.decay=constant", "checkpoint.save=false",
            *overrides]  # fmt: skip


def sequences(stdout: str) -> int:
    return int(re.search(r"sft: (\d+) training sequences", stdout).group(1))


@pytest.fixture(scope="module")
def reference(tok_dir, alternating, tmp_path_factory) -> Path:
    """The whole global batch in one micro-batch: per-micro-batch and global token means coincide."""
    run_dir = tmp_path_factory.mktemp("loss_norm_reference")
    proc = single(args(tok_dir, alternating, run_dir), module=MODULE, timeout=TIMEOUT)
    assert sequences(proc.stdout) == 4
    values = losses(run_dir)
    assert len(values) == 3 and values[-1] < values[0] - 0.5, f"training must move the loss: {values}"
    return run_dir


LAYOUTS = {  # name -> (processes, overrides)
    "mbs1-accum4": (1, ["train.micro_batch_size=1"]),
    "dp2-mbs1-accum2": (2, ["train.micro_batch_size=1"]),
    "pp2-mbs1": (2, ["train.micro_batch_size=1", "parallel.pipeline=2"]),  # 4 pipeline micro-batches
    # 2 sequences of [1-word, 25-word] examples; global batch 2 sequences = the same 4 examples
    "packed-mbs1-accum2": (
        1,
        ["finetune.packing=true", "train.global_batch_size=2", "train.micro_batch_size=1"],
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sft_loss_does_not_depend_on_the_split(name, tok_dir, alternating, reference, tmp_path):
    nproc, overrides = LAYOUTS[name]
    run = single if nproc == 1 else lambda a, **kw: torchrun(nproc, a, **kw)
    proc = run(args(tok_dir, alternating, tmp_path, *overrides), module=MODULE, timeout=TIMEOUT)
    assert sequences(proc.stdout) == (2 if "packed" in name else 4)
    worst = assert_close_rel(curve(tmp_path), curve(reference), REL)
    print(f"{name}: {curve(tmp_path)} vs mbs=4 {curve(reference)}: worst relative difference {worst:.1e}")


def test_per_micro_batch_mean_is_told_apart(tok_dir, alternating, reference, tmp_path):
    """Control: the old normalization at mbs=1 x accumulation 4 weighs a 3-token reply like a 33-token one."""
    control = [MODULE, *args(tok_dir, alternating, tmp_path, "train.micro_batch_size=1")]
    single(control, module=CONTROL, timeout=TIMEOUT)
    old, right = losses(tmp_path), losses(reference)
    gaps = [abs(a - b) / b for a, b in zip(old, right)]
    print(f"per-micro-batch means {old} vs global token mean {right}: relative gaps {gaps}")
    assert gaps[0] > 100 * REL  # already the loss of step 1 (same weights) is another average
    assert max(gaps[1:]) > 1e-2  # and the gradients differ: the runs drift apart


def test_chat_records_loss_does_not_depend_on_the_split(tok_dir, chat, tmp_path):
    single(args(tok_dir, chat, tmp_path / "ref"), module=MODULE, timeout=TIMEOUT)
    dp2 = args(tok_dir, chat, tmp_path / "dp2", "train.micro_batch_size=1")
    torchrun(2, dp2, module=MODULE, timeout=TIMEOUT)
    worst = assert_close_rel(curve(tmp_path / "dp2"), curve(tmp_path / "ref"), REL)
    print(f"chat: dp2 mbs1 {curve(tmp_path / 'dp2')} vs mbs=4 {curve(tmp_path / 'ref')}: worst {worst:.1e}")


def test_classification_loss_does_not_depend_on_the_split(tok_dir, tmp_path):
    """Classification divides by the global batch's example weights through the same normalizer (its
    training batches hold whole examples of weight 1, so the old per-micro-batch mean was right there by
    luck); validation pads its last batch with weight-0 examples. PP=2 with 4 micro-batches of 4 against
    one micro-batch of 16, 3 steps (one epoch of 48 examples)."""
    root = tmp_path / "data"
    root.mkdir()
    train = write_jsonl(root / "train.jsonl", classify_rows(48, seed=0))
    valid = write_jsonl(root / "valid.jsonl", classify_rows(11, seed=1))  # 11: fillers of weight 0
    common = ["--config", CLASSIFY_TINY, "--set", f"data.tokenizer={tok_dir}", f"finetune.train={train}",
              f"finetune.valid={valid}", "train.steps=3", "train.log_interval=1", "train.eval_interval=0",
              "train.global_batch_size=16", "optim.lr=0.01", "optim.warmup_steps=0", "optim.decay=constant",
              "checkpoint.save=false"]  # fmt: skip
    single([*common, f"train.run_dir={tmp_path / 'ref'}", "train.micro_batch_size=16"], module=MODULE,
           timeout=TIMEOUT)  # fmt: skip
    pp2 = [*common, f"train.run_dir={tmp_path / 'pp2'}", "train.micro_batch_size=4", "parallel.pipeline=2"]
    torchrun(2, pp2, module=MODULE, timeout=TIMEOUT)
    worst = assert_close_rel(curve(tmp_path / "pp2"), curve(tmp_path / "ref"), REL)
    print(f"classify: pp2 {curve(tmp_path / 'pp2')} vs mbs=16 {curve(tmp_path / 'ref')}: worst {worst:.1e}")
