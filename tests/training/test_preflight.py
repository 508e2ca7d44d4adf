"""Mismatches are caught before start-up (no process group: tests/entry_point.py --no-start-up), each
with a one-line error naming the field or file: checkpoint shape, token ids beyond the vocab, another tokenizer,
missing or corrupt index files."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cmd
from tests.training.helpers import (
    assert_refused_before_start_up,
    single,
    torchrun,
    train_args,
    write_corpus,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus and a run directory holding a 2-step checkpoint (tiny model, TP1/PP1)."""
    root = tmp_path_factory.mktemp("preflight")
    corpus = write_corpus(root / "corpus" / "patterns")
    run = root / "run"
    single(train_args(corpus, run, steps=2))
    return corpus, run


def test_weights_only_load_with_another_model_shape(trained, tmp_path):
    corpus, run = trained
    out = single(
        train_args(corpus, tmp_path, f"checkpoint.load={run}", "model.hidden_size=96", "model.num_layers=3"),
        check=False,
        no_start_up=True,
    )
    assert_refused_before_start_up(
        out, "model.num_layers: checkpoint 2 vs config 3", "model.hidden_size: checkpoint 64 vs config 96"
    )


def test_resume_with_another_model_shape(trained, tmp_path):
    corpus, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    out = single(train_args(corpus, copy, "model.ffn_hidden_size=256"), check=False, no_start_up=True)
    assert_refused_before_start_up(
        out,
        f"resuming from {copy / 'checkpoints' / 'step_00000002'}: ",
        "model.ffn_hidden_size: checkpoint 128 vs config 256",
        "keep model.ffn_hidden_size=128 to resume",
    )


def test_resume_at_another_parallel_layout_says_so_before_start_up(trained, tmp_path):
    """Another layout is resumed by resharding the optimizer state (tests/training/test_reshard_resume.py):
    pre-flight says what will happen in one line before any process group (refusals: test_resume_rules)."""
    from tests.entry_point import START_UP_REACHED

    corpus, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    out = torchrun(2, train_args(corpus, copy, "parallel.tensor=2"), check=False, no_start_up=True)
    line = "resuming step_00000002 saved at TP1 PP1 DP1 ZeRO-0 into TP2 PP1 DP1 ZeRO-0 (resharding optimizer state)"
    assert line in out.stdout and START_UP_REACHED in out.stderr, (out.stdout[-2000:], out.stderr[-2000:])


def test_token_ids_beyond_the_vocab(trained, tmp_path):
    corpus, _ = trained
    out = single(train_args(corpus, tmp_path, "model.vocab_size=300"), check=False, no_start_up=True)
    top = int(np.fromfile(f"{corpus}.bin", dtype=np.uint16).max())  # the id the check must name
    assert top >= 300
    assert_refused_before_start_up(
        out,
        f"{corpus}.bin: token id {top} is outside the vocabulary [0, 300); "
        "the data was tokenized with another tokenizer",
    )


def test_missing_and_corrupt_index(trained, tmp_path):
    corpus, _ = trained
    for damage in ("missing", "corrupt"):
        prefix = tmp_path / damage / "patterns"
        prefix.parent.mkdir()
        for ext in (".bin", ".idx"):
            shutil.copy(f"{corpus}{ext}", f"{prefix}{ext}")
        idx = Path(f"{prefix}.idx")
        if damage == "missing":
            idx.unlink()
        else:
            idx.write_bytes(b"not an index" * 10)
        out = single(train_args(prefix, tmp_path / f"run-{damage}"), check=False, no_start_up=True)
        assert_refused_before_start_up(out, str(idx))


def test_data_from_another_tokenizer(trained, tmp_path):
    corpus, _ = trained
    docs = tmp_path / "docs.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs.write_text(
        "".join(json.dumps({"text": " ".join(words[i:] + words[:i]) * 5}) + "\n" for i in range(200))
    )
    tok = tmp_path / "tok"
    run_cmd(
        [
            sys.executable,
            "-m",
            "tokenizer.train",
            "--input",
            str(docs),
            "--vocab-size",
            "400",
            "--output",
            str(tok),
        ],
        timeout=180,
    )
    prefix = tmp_path / "data" / "patterns"
    prefix.parent.mkdir()
    for ext in (".bin", ".idx"):
        shutil.copy(f"{corpus}{ext}", f"{prefix}{ext}")
    meta = {"tokenizer_fingerprint": "0" * 64, "vocab_size": 400, "dtype": "uint16"}
    Path(f"{prefix}.meta.json").write_text(json.dumps(meta))
    args = train_args(prefix, tmp_path / "run", f"data.tokenizer={tok}")
    args.remove("model.vocab_size=512")  # taken from the tokenizer
    out = single(args, check=False, no_start_up=True)
    assert_refused_before_start_up(out, f"{prefix}.meta.json", "different tokenizer")


def test_a_pipeline_stage_with_nothing_to_train_is_refused(tmp_path):
    """Freezing that leaves a pipeline stage without a trainable parameter (DeepSpeed refuses its empty
    optimizer after start-up, a traceback on every rank) stops in pre-flight naming the stage."""
    from bigtrain.config import ConfigError, load_config
    from bigtrain.pretrain import preflight, stages_with_nothing_to_train

    def cfg(*extra):
        sets = ["parallel.pipeline=2", "model.vocab_size=512", f"train.run_dir={tmp_path}", *extra]
        return load_config("configs/classify-tiny.yaml", sets).resolve(2)

    frozen = cfg("finetune.freeze_embeddings=true", "finetune.freeze_layers=1")
    assert stages_with_nothing_to_train(frozen) == [0]
    assert stages_with_nothing_to_train(cfg("finetune.freeze_layers=1")) == []
    with pytest.raises(
        ConfigError, match=r"parallel.pipeline=2: pipeline stage\(s\) \[0\] would hold no trainable"
    ):
        preflight(frozen, rank=1)  # rank 1: the data checks are rank 0's
