"""Which samples each data-parallel rank reads, in which micro-batch, and how a run resumes.

The global order is the dataset's index order (megatron-core already shuffled it). Global batch ``k``
after a start at ``consumed_samples`` is ``[consumed + k*G, consumed + (k+1)*G)``; data-parallel rank
``r`` of ``D`` takes the contiguous slice ``r*G/D ... (r+1)*G/D`` of it, cut into micro-batches. The
only state is the global number of consumed samples, which does not depend on ``D``: a checkpoint
written by 2 ranks resumes on 1 (or 8) with the same batches, just sliced differently.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


class MicroBatchSampler:
    """Yields this rank's micro-batches (lists of sample indices) of every remaining global batch.

    Also usable as a ``torch.utils.data.DataLoader`` ``batch_sampler``. A trailing incomplete global
    batch is dropped: every rank must run the same number of steps.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ):
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by micro_batch_size*dp_size = "
                f"{micro_batch_size}*{dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per rank per global batch."""
        return self.per_rank // self.micro_batch_size

    @property
    def num_global_batches(self) -> int:
        """Complete global batches left after ``consumed_samples``."""
        return max(0, self.total_samples - self.consumed_samples) // self.global_batch_size

    def __len__(self) -> int:
        return self.num_global_batches * self.grad_accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        mbs, start = self.micro_batch_size, self.consumed_samples
        for _ in range(self.num_global_batches):
            first = start + self.dp_rank * self.per_rank
            for m in range(self.grad_accum_steps):
                yield list(range(first + m * mbs, first + (m + 1) * mbs))
            start += self.global_batch_size


def stack(items: Sequence[Mapping[str, Any]], keys: Iterable[str] | None = None) -> Batch:
    """``{key: [len(items), *item shape]}`` for each of ``keys`` (default: every key of the first item);
    the items' values are tensors or arrays of one shape per key."""
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in keys or items[0]}


# what the bert family's items add (bigtrain.data.bert), and GPT items with data.document_mask
# (SampleDataset): stacked as they come, 0-dim values to [b]
EXTRA_KEYS = ("token_types", "attention_mask", "nsp_labels", "positions", "doc_ids")


def collate(items: Sequence[Mapping[str, Any]]) -> Batch:
    """Stack dataset items into the trainer's micro-batch: long tokens/labels, float loss mask, the
    samples' global ids (``sample_ids``), and the :data:`EXTRA_KEYS` the items have."""
    batch = stack(items, ("tokens", "labels", "loss_mask", *(k for k in EXTRA_KEYS if k in items[0])))
    return {
        **batch,
        "tokens": batch["tokens"].long(),
        "labels": batch["labels"].long(),
        "loss_mask": batch["loss_mask"].float(),
        "sample_ids": torch.tensor([int(it["sample_id"]) for it in items], dtype=torch.long),
    }


def _pinned(batch: Batch) -> Batch:
    return {k: v.pin_memory() for k, v in batch.items()}


class _End:
    pass


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _produce(batches: Iterator[Batch], out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread body. It holds no reference to its BatchIterator, so dropping an unfinished
    iterator (validation stops after ``eval_steps``) lets it be collected, which stops this thread."""

    def put(obj: object) -> bool:
        while not stop.is_set():
            try:
                out.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for batch in batches:
            if not put(batch):
                return
        put(_End())
    except BaseException as e:  # re-raised in the consumer, where the trainer sees it
        put(_Failure(e))


class BatchIterator:
    """Collated micro-batches for one data-parallel rank, optionally prefetched by a background thread.

    ``consumed_samples`` counts what the trainer has taken (whole global batches), never what the
    thread has read ahead, so saving it with a checkpoint resumes exactly.
    """

    def __init__(
        self, dataset: Any, sampler: MicroBatchSampler, prefetch: int = 2, pin_memory: bool | None = None
    ):
        self.dataset = dataset
        self.sampler = sampler
        self._start = sampler.consumed_samples
        self._delivered = 0
        self._done = False
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        batches = self._generate(dataset, sampler, pin)
        self._thread: threading.Thread | None = None
        if prefetch > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=_produce,
                args=(batches, self._queue, self._stop),
                name="bigtrain-data-prefetch",
                daemon=True,
            )
            self._thread.start()
        else:
            self._batches = batches

    @staticmethod
    def _generate(dataset: Any, sampler: MicroBatchSampler, pin: bool) -> Iterator[Batch]:
        for indices in sampler:
            batch = collate([dataset[i] for i in indices])
            yield _pinned(batch) if pin else batch

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed once the trainer finishes the global batches it has taken so far."""
        whole = self._delivered // self.sampler.grad_accum_steps
        return self._start + whole * self.sampler.global_batch_size

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def __len__(self) -> int:
        return len(self.sampler) - self._delivered

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        item = self._batches.__next__() if self._thread is None else self._take(self._thread)
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        self._delivered += 1
        return item

    def _take(self, thread: threading.Thread) -> Batch | _End:
        """The next item from the prefetch ``thread``'s queue."""
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("data prefetch thread ended without a result") from None
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        """Stop the prefetch thread (also done when the iterator is garbage-collected)."""
        self._done = True
        if self._thread is not None:
            self._stop.set()
            # Wait for it: a daemon thread still inside a torch op at interpreter exit aborts the process.
            self._thread.join(timeout=10)

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()


def batch_iterator(
    dataset: Any,
    consumed_samples: int,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    *,
    prefetch: int = 2,
    pin_memory: bool | None = None,
) -> BatchIterator:
    """This rank's micro-batches from ``consumed_samples`` on: ``tokens``/``labels`` LongTensor[mbs, seq],
    ``loss_mask`` FloatTensor[mbs, seq], ``sample_ids`` LongTensor[mbs]; bert items add ``token_types`` /
    ``attention_mask`` LongTensor[mbs, seq] and ``nsp_labels`` LongTensor[mbs].

    ``prefetch`` micro-batches are read ahead on a thread (0: read on demand); batches are pinned when
    CUDA is available unless ``pin_memory`` says otherwise. Ends after the last complete global batch.
    """
    sampler = MicroBatchSampler(
        len(dataset), consumed_samples, micro_batch_size, global_batch_size, dp_rank, dp_size
    )
    return BatchIterator(dataset, sampler, prefetch=prefetch, pin_memory=pin_memory)
