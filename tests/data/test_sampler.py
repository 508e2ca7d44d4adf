"""Per-rank slices of global batches, exact resume (also across a data-parallel size change), epochs."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import torch

from bigtrain.data import MicroBatchSampler, batch_iterator, build_datasets
from tests.data.util import EOD, blend_corpora, make_cfg, write_dataset

G, MBS = 8, 2


class Numbers(torch.utils.data.Dataset):
    """Sample i is the token i repeated: enough to see which sample went where."""

    def __init__(self, n: int, seq: int = 4):
        self.n, self.seq = n, seq

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        t = torch.full((self.seq,), i)
        return {"tokens": t, "labels": t + 1, "loss_mask": torch.ones(self.seq), "sample_id": i}


def steps_of(dataset, consumed: int, dp: int, steps: int, prefetch: int = 2) -> list[list[int]]:
    """Sample ids of each optimizer step: every rank's micro-batches of one global batch, rank order."""
    iters = [batch_iterator(dataset, consumed, MBS, G, r, dp, prefetch=prefetch) for r in range(dp)]
    accum = G // (MBS * dp)
    out = []
    for _ in range(steps):
        step = []
        for it in iters:
            for _ in range(accum):
                batch = next(it)
                assert batch["tokens"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32
                assert batch["tokens"].shape[0] == MBS
                step += batch["sample_ids"].tolist()
        out.append(step)
    return out


def test_rank_slices_are_contiguous_parts_of_each_global_batch():
    for dp in (1, 2, 4):
        for rank in range(dp):
            sampler = MicroBatchSampler(64, 16, MBS, G, rank, dp)
            micro = list(sampler)
            assert (
                sampler.grad_accum_steps == G // (MBS * dp)
                and len(micro) == len(sampler) == 6 * sampler.grad_accum_steps
            )
            per = G // dp
            first_batch = [i for mb in micro[: sampler.grad_accum_steps] for i in mb]
            assert first_batch == list(range(16 + rank * per, 16 + (rank + 1) * per))
    with pytest.raises(ValueError, match="not divisible"):
        MicroBatchSampler(64, 0, 3, G, 0, 2)


def test_collated_batches_hold_the_right_samples():
    batches = list(batch_iterator(Numbers(32), 8, MBS, G, 1, 2, prefetch=0))
    assert len(batches) == 3 * 2
    first = batches[0]
    assert first["sample_ids"].tolist() == [12, 13]
    assert first["tokens"].tolist() == [[12] * 4, [13] * 4] and first["labels"][0, 0] == 13


@pytest.mark.parametrize("resume_dp", [2, 1, 4])
def test_resume_continues_the_same_global_batches(tmp_path, resume_dp):
    web, code = blend_corpora(tmp_path)
    train, _ = build_datasets(make_cfg([[0.7, web], [0.3, code]], steps=20, gbs=G, mbs=MBS))
    uninterrupted = steps_of(train, 0, 2, 20)
    for k, ids in enumerate(uninterrupted):
        assert ids == list(range(k * G, (k + 1) * G))  # global batch k is samples [kG, (k+1)G)

    # The state the trainer saves at step 10 is the consumed-sample count; the iterator agrees with it
    # although its thread has read ahead.
    its = [batch_iterator(train, 0, MBS, G, r, 2, prefetch=4) for r in range(2)]
    for _ in range(10 * G // (MBS * 2)):
        for it in its:
            next(it)
    time.sleep(0.05)
    assert [it.consumed_samples for it in its] == [10 * G, 10 * G]
    saved = its[0].state_dict()["consumed_samples"]

    resumed = steps_of(train, saved, resume_dp, 10)
    assert resumed == uninterrupted[10:20]
    tokens_after = next(batch_iterator(train, saved, MBS, G, 0, resume_dp))["tokens"]
    assert torch.equal(tokens_after, torch.stack([train[i]["tokens"] for i in range(80, 80 + MBS)]))


def test_one_epoch_sees_every_sample_exactly_once(tmp_path):
    seq = 16
    n_samples = 64
    rng = np.random.default_rng(7)
    # 41 documents of 25 tokens = 1025 = 64 * 16 + 1 tokens: exactly 64 samples in one epoch.
    docs = [[*rng.integers(4, 100, size=24).tolist(), EOD] for _ in range(41)]
    prefix = write_dataset(tmp_path / "epoch", docs)
    train, _ = build_datasets(make_cfg(prefix, valid=prefix, seq=seq, steps=n_samples // G))
    (gpt,) = train.gpt_datasets
    assert len(train) == n_samples
    assert sorted(np.asarray(gpt.shuffle_index).tolist()) == list(range(n_samples))

    seen = [i for step in steps_of(train, 0, 2, n_samples // G) for i in step]
    assert sorted(seen) == list(range(n_samples))  # no sample twice, none skipped

    # Content: unshuffled sample j is tokens [16j, 16j+17) of the documents in megatron's document order.
    stream = np.concatenate([docs[d] for d in np.asarray(gpt.document_index)])
    covered = np.zeros(len(stream), dtype=int)
    for i in seen:
        item = train[i]
        j = int(gpt.shuffle_index[i])
        window = np.append(item["tokens"].numpy(), item["labels"][-1].item())
        assert window.tolist() == stream[j * seq : j * seq + seq + 1].tolist()
        covered[j * seq : (j + 1) * seq] += 1
    assert covered[:-1].tolist() == [1] * (len(stream) - 1)


def test_abandoned_prefetch_thread_stops():
    it = batch_iterator(Numbers(400), 0, MBS, G, 0, 1, prefetch=2)
    next(it)
    thread = it._thread
    assert thread is not None and thread.is_alive()
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_close_joins_the_prefetch_thread():
    it = batch_iterator(Numbers(400), 0, MBS, G, 0, 1, prefetch=2)
    next(it)
    it.close()
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_errors_reach_the_consumer():
    class Broken(Numbers):
        def __getitem__(self, i):
            if i == 9:
                raise KeyError("sample 9 is unreadable")
            return super().__getitem__(i)

    it = batch_iterator(Broken(32), 0, MBS, G, 0, 1)
    with pytest.raises(KeyError, match="sample 9"):
        for _ in it:
            pass
