"""``data.document_mask``: pretraining on packed documents that do not attend across their boundaries.

The model built by bigtrain's registry gives each document of a packed sample the logits it gets run
alone (and not without the mask); the real entry point trains with it, resumes on the same curve, and
a two-stage pipeline equals the single process."""

from __future__ import annotations

import pytest
import torch

from bigtrain.batch import LM_BATCH, PACKED_BATCH
from bigtrain.config import ConfigError, load_config
from bigtrain.data.datasets import document_ids
from tests.conftest import REPO
from tests.training.helpers import (
    TINY,
    assert_close_rel,
    losses,
    metrics,
    single,
    torchrun,
    train_args,
    write_corpus,
)

LENGTHS = (11, 23, 1, 13)  # documents packed in one 48-token sample (one of a single token)


def _model(*overrides: str):
    from bigtrain.registry import build_model, train_spec

    cfg = load_config(TINY, ["model.seq_length=48", *overrides]).resolve(1)
    return build_model(cfg).eval(), train_spec(cfg)


def _packed_sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [1, 48], per-document positions, and doc ids derived from them as the data layer does."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 512, (1, sum(LENGTHS)), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return tokens, positions, document_ids(positions)


def test_packed_logits_equal_each_document_run_alone():
    model, spec = _model("data.document_mask=true")
    assert spec.batch == PACKED_BATCH and model.num_inputs == 3
    tokens, positions, doc_ids = _packed_sample()
    with torch.no_grad():
        packed = model.outputs(tokens, positions, doc_ids)  # [s, 1, vocab]
        unmasked = model.outputs(tokens)  # the same weights, plain causal attention over the sample
        starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
        alone = torch.cat([model.outputs(tokens[:, a:b]) for a, b in zip(starts, starts[1:])])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    # the control: without the mask every document after the first sees the ones before it
    first = LENGTHS[0]
    torch.testing.assert_close(unmasked[:first], alone[:first], rtol=0, atol=1e-5)
    assert (unmasked[first:] - alone[first:]).abs().amax(dim=(1, 2)).min() > 1e-3
    # the loss the pipeline engine computes takes the packed inputs (PACKED_BATCH's order)
    labels, loss_mask = torch.roll(tokens, -1, 1), torch.ones(tokens.shape)
    with torch.no_grad():
        loss = model(tokens, positions, doc_ids, labels, loss_mask)
        plain = model(tokens, positions, torch.zeros_like(doc_ids), labels, loss_mask)
    assert torch.isfinite(loss) and abs(float(loss) - float(plain)) > 1e-4


def test_document_mask_off_builds_the_plain_model_and_other_families_refuse():
    model, spec = _model()
    assert spec.batch == LM_BATCH and model.num_inputs == 1
    for config, overrides, needle in (
        (TINY, ["finetune.task=sft", "data.tokenizer=x", "finetune.train=x"], "finetune.task sft"),
        (str(REPO / "configs" / "bert-tiny.yaml"), [], "model.family bert"),
    ):
        with pytest.raises(ConfigError, match=f"data.document_mask is for llama pretraining .*{needle}"):
            load_config(config, ["data.document_mask=true", *overrides]).resolve(1)


@pytest.mark.slow
def test_pretraining_with_document_mask_trains_resumes_and_pipelines(tmp_path):
    """Through ``bigtrain.pretrain``: the loss falls; a run killed at step 7 resumes from its step-5
    checkpoint on the same curve; a two-stage pipeline (packed inputs between stages) equals the single
    process within 1e-5; the same run without the mask trains a different curve."""
    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    common = ["model.seq_length=128", "checkpoint.interval=5", "optim.warmup_steps=2"]
    on = [*common, "data.document_mask=true"]
    full, split, pp2, off = (tmp_path / n for n in ("full", "split", "pp2", "off"))
    single(train_args(corpus, full, *on))
    curve = losses(full)
    assert len(curve) == 10 and curve[-1] < 0.85 * curve[0], curve

    crashed = single(train_args(corpus, split, *on, "debug.crash_at_step=7"), check=False)
    assert crashed.returncode != 0
    out = single(train_args(corpus, split, *on))
    assert "resumed from step 5" in out.stdout
    resumed = {r["step"]: r["loss"] for r in metrics(split)}
    for step in range(6, 11):
        assert abs(resumed[step] - curve[step - 1]) <= 1e-6 * abs(curve[step - 1]), (step, resumed, curve)

    torchrun(2, train_args(corpus, pp2, *on, "parallel.pipeline=2"))
    assert_close_rel(losses(pp2), curve, 1e-5)

    single(train_args(corpus, off, *common))
    assert max(abs(a - b) for a, b in zip(losses(off), curve)) > 1e-3
