"""Training and validation sample streams on megatron-core's dataset stack.

``build_datasets`` turns ``cfg.data`` into megatron-core ``GPTDataset``s (one per shard, with the
shuffled document/sample/shuffle index maps megatron builds and caches) blended by ``BlendedDataset``,
through ``BlendedMegatronDatasetBuilder`` so the rank-0-builds-first protocol and the on-disk cache
format are megatron's own. Every item is a fixed window of ``seq_length + 1`` tokens, served as
``tokens``/``labels`` shifted by one. ``SequentialWindows`` is the unshuffled view used for evaluation.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from bigtrain import compat
from bigtrain.config import Config, ConfigError, TrainConfig
from bigtrain.data.corpus import DataError, DataSpec
from bigtrain.data.samples import MegatronSamples, blend_members, dataset_options
from bigtrain.data.validate import Corpus, ShardInfo, validate_data
from tokenizer.writer import INDEX_INPUTS_FILE, INDEX_MAPS_DIR, default_cache_dir

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DEFAULT_EOD = 2  # the project tokenizer's eos/eod id, used when no tokenizer is given


class TokenizerInfo:
    """The tokenizer facts megatron-core's GPT datasets need, and nothing that needs a model file.

    ``GPTDatasetConfig.tokenizer`` is read for ``eod`` (loss/position handling), ``pad`` (masked in
    labels) and ``vocab_size``, and is part of the index-cache key through ``unique_identifiers``: a
    different tokenizer fingerprint means different cache files, never a stale shuffle.
    """

    def __init__(
        self, vocab_size: int | None, eod: int, pad: int | None = None, fingerprint: str | None = None
    ):
        self.vocab_size = vocab_size
        self.eod = eod
        self._pad = pad
        self.fingerprint = fingerprint
        self.unique_identifiers = {
            "class": type(self).__name__,
            "vocab_size": vocab_size,
            "eod": eod,
            "pad": pad,
            "fingerprint": fingerprint,
        }

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        if self._pad is None:  # megatron-core falls back to an id that never occurs in data
            raise AttributeError("no pad id")
        return self._pad

    def __repr__(self) -> str:
        return f"TokenizerInfo({self.unique_identifiers})"

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenizerInfo:
        """From a ``tokenizer.Tokenizer`` (or anything with ``vocab_size``/``eod_id``/``pad_id``)."""
        eod = getattr(tokenizer, "eod_id", None)
        if eod is None:
            eod = tokenizer.eos_id
        pad = getattr(tokenizer, "pad_id", None)
        return cls(
            int(tokenizer.vocab_size),
            int(eod),
            None if pad is None or pad < 0 else int(pad),
            getattr(tokenizer, "fingerprint", None),
        )

    @classmethod
    def from_data(cls, vocab_size: int | None, shards: Sequence[ShardInfo]) -> TokenizerInfo:
        """Without a tokenizer: the ids recorded in the data's metadata, else the project defaults."""
        meta = next((s.meta for s in shards if s.meta), None) or {}
        eod, pad = meta.get("eod_id"), meta.get("pad_id")  # keys written by tokenizer.preprocess
        vocab = vocab_size if vocab_size is not None else meta.get("vocab_size")
        return cls(
            None if vocab is None else int(vocab),
            _DEFAULT_EOD if eod is None else int(eod),
            None if pad is None or int(pad) < 0 else int(pad),
            None,
        )


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """Per-token document ids [..., s] (int64, 0 for the sample's first document) from positions that
    restart at 0 at every document, as megatron-core's ``reset_position_ids`` makes them: a document
    starts wherever the position is 0, so the EOD ending a document keeps its id and the token after it
    starts the next. Derived from the positions rather than scanned for EODs again, so the two can never
    disagree. ValueError when ``positions`` does not start at 0 (not per-document positions)."""
    if positions.shape[-1] and bool((positions[..., 0] != 0).any()):
        raise ValueError("positions must start at 0 (per-document positions from reset_position_ids)")
    return (positions == 0).long().cumsum(-1) - 1


class SampleDataset(MegatronSamples):
    """A megatron-core top-level dataset of GPT windows with our item format.

    Items are megatron's GPT dict (``tokens``, ``labels``, ``loss_mask``, ``position_ids``) plus
    ``sample_id`` (the index asked for: the sample's place in the global order, what resume and tests
    compare) and ``corpus_id`` (which blend member it came from, for mix checks and per-corpus metrics).
    ``documents`` (``data.document_mask``; megatron built with ``reset_position_ids``): also ``positions``
    (megatron's per-document ``position_ids``) and ``doc_ids`` (:func:`document_ids`), both [s] int64, what
    the packed model's attention and rotary embedding take (``bigtrain.batch.PACKED_BATCH``).
    """

    def __init__(
        self,
        dataset: Any,
        corpus_of_dataset: Sequence[int],
        corpora: Sequence[Corpus],
        split: str,
        documents: bool = False,
    ):
        super().__init__(dataset, corpus_of_dataset, corpora, split)
        compat.uncache_gpt_masks(self.gpt_datasets)  # megatron-core 0.16's mask cache (Megatron-LM#1711)
        self.documents = documents

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = int(idx)
        item, corpus = self.read(idx)
        out = {
            "tokens": item["tokens"],
            "labels": item["labels"],
            "loss_mask": item["loss_mask"],
            "position_ids": item["position_ids"],
            "sample_id": idx,
            "corpus_id": corpus,
        }
        if self.documents:
            out |= {"positions": item["position_ids"], "doc_ids": document_ids(item["position_ids"])}
        return out

    @property
    def gpt_datasets(self) -> list[Any]:
        """The per-shard megatron ``GPTDataset``s under the blend (one when nothing is blended)."""
        return list(getattr(self.dataset, "datasets", [self.dataset]))


# ------------------------------------------------------------------------------------ sizes
def num_evaluations(train: TrainConfig) -> int:
    """How often the trainer validates: every ``eval_interval`` steps and at the end (at least once)."""
    if train.steps <= 0:
        return 1
    due = (
        set(range(train.eval_interval, train.steps + 1, train.eval_interval))
        if train.eval_interval > 0
        else set()
    )
    return len(due | {train.steps})


def num_samples(cfg: Config) -> tuple[int, int]:
    """(train, valid) samples to build: every step's global batch, and every evaluation's batches."""
    t = cfg.train
    train = cfg.data.train_samples or max(1, t.steps) * t.global_batch_size
    valid = max(1, t.eval_steps) * t.global_batch_size * num_evaluations(t)
    return train, valid


# ------------------------------------------------------------------------------------ distributed
def _dist_rank() -> int | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return None


def rank0_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then (if it succeeded) on the others; every rank raises rank 0's error.

    Validation scans files and writes the stats cache: rank 0 does the work once, the others then hit
    the cache. Sharing the outcome keeps a bad dataset from leaving ranks 1..N at a barrier forever.
    """
    rank = _dist_rank()
    if rank is None or torch.distributed.get_world_size() == 1:
        return fn()
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            result = fn()
        except Exception as e:
            outcome[0] = (isinstance(e, DataError), str(e) or type(e).__name__)
            torch.distributed.broadcast_object_list(outcome, src=0)
            raise
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        is_data_error, message = outcome[0]
        raise (DataError if is_data_error else RuntimeError)(
            message if is_data_error else f"rank 0: {message}"
        )
    return fn() if rank != 0 else result


# ------------------------------------------------------------------------------------ building
def index_cache_dir(root: str, shards: Sequence[ShardInfo]) -> str:
    """``ROOT/index/DIGEST``, created with ``inputs.json``: the home of megatron-core's index maps for
    exactly these files (what ``GPTDatasetConfig.path_to_cache`` gets).

    megatron-core names its cache files by a hash of the dataset config (paths, seed, lengths, sample
    counts, split, tokenizer), not of what the files hold: after re-preprocessing to the same prefix it
    loaded the old run's document/sample maps for the new ``.bin`` (other samples, then an IndexError
    naming nothing). DIGEST covers every shard's :func:`~bigtrain.data.validate.data_identity` (sizes,
    mtimes, preprocessing run), so changed files get new maps. ``inputs.json`` lists the prefixes, for
    ``tokenizer.preprocess`` to delete the entry when it replaces one of them. Raises DataError naming
    the directory when it cannot be written.
    """
    entries = sorted({s.prefix: s.identity for s in shards}.items())
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(root, INDEX_MAPS_DIR, digest)
    inputs = os.path.join(path, INDEX_INPUTS_FILE)
    if os.path.isfile(inputs):
        return path
    try:
        os.makedirs(path, exist_ok=True)
        tmp = f"{inputs}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"prefixes": [p for p, _ in entries], "identities": [i for _, i in entries]}, f, indent=1
            )
        os.replace(tmp, inputs)
    except OSError as e:
        raise DataError(
            f"{path}: cannot write the index-map cache ({e.strerror}); set data.cache_dir"
        ) from None
    return path


def _check_split(corpora: Sequence[Corpus], split: str, documents: bool = False) -> None:
    """Each shard is split by document; a part with no documents would make megatron loop forever.
    GPT's documents are its sequences; the bert family's (``documents``) are runs of sentences."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError, ZeroDivisionError):
        raise DataError(f"data.split: {split!r} is not a train,valid,test split like '98,2,0'") from None
    for corpus in corpora:
        for shard in corpus.shards:
            n = shard.num_docs if documents else shard.num_sequences
            for name, part in zip(("train", "valid", "test"), matrix):
                if part is not None and shard.num_tokens and round(part[1] * n) <= round(part[0] * n):
                    raise DataError(
                        f"{shard.prefix}: {n} documents are too few for data.split {split!r} (its {name} "
                        "part would be empty); set data.valid or use fewer, larger shards"
                    )


def _gpt_options(cfg: Config, info: TokenizerInfo, path_to_cache: str | None) -> dict[str, Any]:
    """GPTDatasetConfig fields shared by real and mock data. Positions restart after every EOD with
    ``data.document_mask`` (megatron's ``reset_position_ids``; :func:`document_ids` derives the documents
    from them). Never a materialized attention mask: megatron's is a dense [1, s, s] per sample (4 GiB
    of floats while built at s = 32k); the model builds its mask from the document ids instead, so
    ``reset_attention_mask`` (which only edits that dense mask) stays off. The EOD's own prediction
    (the next document's first token) keeps its loss, as Megatron's default ``eod_mask_loss``."""
    return dict(
        **dataset_options(cfg, info, path_to_cache),
        reset_position_ids=cfg.data.document_mask,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def _check_sample_fits(datasets: Sequence[Any], seq_length: int) -> None:
    """Each training member's part of its shard must hold one whole sample of ``seq_length + 1`` tokens:
    megatron builds as many epochs as the samples need, so a smaller part would fill each sample with its
    own documents repeated over and over (at long context, a corpus of a few thousand tokens silently
    trains on 32k-token copies of itself). DataError naming the shard, its part and both sizes. Not
    asked of validation parts: a split's few-percent part of a small shard is often shorter, and
    repeating it changes no weight."""
    window = seq_length + 1
    for gpt in datasets:
        tokens = int(np.sum(gpt.dataset.sequence_lengths[gpt.indices], dtype=np.int64))
        if tokens < window:
            raise DataError(
                f"{gpt.dataset_path}: its {gpt.index_split.name} part holds {tokens} tokens, fewer than one "
                f"sample of model.seq_length+1 = {window} (megatron would repeat its documents within a "
                "sample); use more data, fewer and larger shards, or a shorter model.seq_length"
            )


def _mock_datasets(
    cfg: Config, tokenizer: Any, sizes: list[int]
) -> tuple[SampleDataset, SampleDataset | None]:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    if tokenizer is not None:
        info = TokenizerInfo.from_tokenizer(tokenizer)
    elif cfg.model.vocab_size:
        info = TokenizerInfo(cfg.model.vocab_size, min(_DEFAULT_EOD, cfg.model.vocab_size - 1))
    else:
        raise DataError("data.mock: needs model.vocab_size or data.tokenizer for the random token range")
    config = GPTDatasetConfig(**_gpt_options(cfg, info, None))
    quiet = logging.getLogger("megatron.core.datasets.gpt_dataset")  # "unable to save indexes": by design
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config).build()
    finally:
        quiet.setLevel(level)
    documents = cfg.data.document_mask
    return SampleDataset(train, [], [], "train", documents), SampleDataset(valid, [], [], "valid", documents)


def build_datasets(cfg: Config, tokenizer: Any = None, sizes: list[int] | None = None) -> tuple[Any, Any]:
    """(train, valid or None) sample datasets for ``cfg``; call on every rank (it may use barriers).
    :class:`SampleDataset`s, or for ``model.family`` bert ``bigtrain.data.bert.BertSampleDataset``s (MLM +
    NSP/SOP items, see :mod:`bigtrain.data.bert`), built the same way from sentence-split data.

    Validates the data first (see :func:`validate_data`), then builds through megatron-core with
    ``train.steps * global_batch_size`` train samples and enough valid samples for every evaluation.
    ``data.valid`` gives a separate validation corpus; otherwise ``data.split`` splits each shard.
    Index maps are cached in ``data.cache_dir`` or ``cache/`` next to the (first) training data, under
    :func:`index_cache_dir` (keyed by the files' identity) and then by megatron by everything else that
    shapes them (seed, lengths, sizes, split, tokenizer): a restart reuses them, new files get new maps.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if sizes is None:  # (train, valid, test) samples
        sizes = [*num_samples(cfg), 0]
    bert = cfg.model.family == "bert"
    if cfg.data.mock:
        if bert:
            from bigtrain.data.bert import build_bert

            return build_bert(cfg, tokenizer, sizes, None, None)
        return _mock_datasets(cfg, tokenizer, sizes)
    d = cfg.data
    if bert and tokenizer is not None:  # before the data: a wrong tokenizer also fails the vocab check
        from bigtrain.data.bert import BertTokenizerInfo

        BertTokenizerInfo.require(tokenizer)
    if d.train is None:
        raise DataError("data.train is not set (a prefix, a glob, or [[weight, prefix], ...])")
    vocab = int(tokenizer.vocab_size) if tokenizer is not None else cfg.model.vocab_size
    cache_dir = os.path.abspath(d.cache_dir) if d.cache_dir else None

    def validate() -> tuple[list[Corpus], list[Corpus] | None, str]:
        train = validate_data(d.train, vocab, tokenizer, cache_dir=cache_dir, field="data.train")
        valid = None
        if d.valid is not None:
            valid = validate_data(d.valid, vocab, tokenizer, cache_dir=cache_dir, field="data.valid")
        else:
            _check_split(train, d.split, documents=bert)
        shards = [s for c in train + (valid or []) for s in c.shards]
        return train, valid, index_cache_dir(cache_dir or default_cache_dir(shards[0].prefix), shards)

    train_corpora, valid_corpora, path_to_cache = rank0_first(validate)
    if bert:
        from bigtrain.data.bert import build_bert

        return build_bert(cfg, tokenizer, sizes, (train_corpora, valid_corpora), path_to_cache)
    all_shards = [s for c in train_corpora + (valid_corpora or []) for s in c.shards]
    info = (
        TokenizerInfo.from_tokenizer(tokenizer)
        if tokenizer is not None
        else TokenizerInfo.from_data(vocab, all_shards)
    )
    train_prefixes, train_weights, train_corpus_of = blend_members(train_corpora)
    common = _gpt_options(cfg, info, path_to_cache)
    if valid_corpora is not None:
        valid_prefixes, valid_weights, valid_corpus_of = blend_members(valid_corpora)
        config = GPTDatasetConfig(
            blend_per_split=[(train_prefixes, train_weights), (valid_prefixes, valid_weights), None], **common
        )
    else:
        valid_corpora, valid_corpus_of = train_corpora, train_corpus_of
        config = GPTDatasetConfig(blend=(train_prefixes, train_weights), split=d.split, **common)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    with compat.single_process_rank():
        train_ds, valid_ds, _ = builder.build()
    _check_sample_fits(list(getattr(train_ds, "datasets", [train_ds])), cfg.model.seq_length)
    documents = d.document_mask
    train = SampleDataset(train_ds, train_corpus_of, train_corpora, "train", documents)
    valid = (
        SampleDataset(valid_ds, valid_corpus_of, valid_corpora, "valid", documents)
        if valid_ds is not None
        else None
    )
    return train, valid


# ------------------------------------------------------------------------------------ evaluation
class SequentialWindows(torch.utils.data.Dataset):
    """Contiguous, non-overlapping ``seq_length + 1``-token windows over a dataset's documents in order.

    Evaluation must not depend on shuffling, seeds or the training sample count: window ``i`` is tokens
    ``[i*(S+1), (i+1)*(S+1))`` of the concatenation of all documents of all shards (shard order, then
    document order); the final partial window is dropped. Items have the training item's shape.
    """

    def __init__(self, data: DataSpec, seq_length: int, vocab_size: int | None = None, tokenizer: Any = None):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        corpora = validate_data(data, vocab_size, tokenizer, field="evaluation data")
        if len(corpora) != 1 or corpora[0].weight is not None:
            raise DataError(f"evaluation data: {data!r} is a weighted blend; evaluate one corpus at a time")
        self.shards = [s for s in corpora[0].shards if s.num_tokens]
        self.seq_length = seq_length
        self.window = seq_length + 1
        self.starts = np.cumsum([0] + [s.num_tokens for s in self.shards]).tolist()
        self.num_tokens = self.starts[-1]
        if self.num_tokens < self.window:
            raise DataError(
                f"{corpora[0].spec.label}: {self.num_tokens} tokens are fewer than one window of {self.window}"
            )
        self._arrays: list[np.memmap] | None = None

    def _memmaps(self) -> list[np.memmap]:
        if self._arrays is None:  # opened lazily: the object stays cheap to pickle into workers
            self._arrays = [
                np.memmap(s.prefix + ".bin", dtype=s.dtype, mode="r", shape=(s.num_tokens,))
                for s in self.shards
            ]
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.num_tokens // self.window

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the concatenated dataset as int64."""
        arrays, parts = self._memmaps(), []
        shard = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            local = start - self.starts[shard]
            take = min(stop, self.starts[shard + 1]) - start
            parts.append(arrays[shard][local : local + take])
            start += take
            shard += 1
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"window {idx} out of range for {len(self)} windows")
        window = torch.from_numpy(self.tokens(idx * self.window, (idx + 1) * self.window))
        return {
            "tokens": window[:-1].contiguous(),
            "labels": window[1:].contiguous(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.long),
            "sample_id": idx,
            "corpus_id": 0,
        }


# ------------------------------------------------------------------------------------ resume
_CHUNK = 1 << 20  # samples compared at a time (bounded memory for runs of billions of tokens)
_TOKEN_PROBES = 16  # samples whose tokens are compared too (a check on reading megatron's index maps)


def _same_gpt_samples(a: Any, pa: np.ndarray, b: Any, pb: np.ndarray) -> np.ndarray:
    """Per position: whether sample ``pa[i]`` of megatron ``GPTDataset`` ``a`` is sample ``pb[i]`` of ``b``.

    Read from megatron's own index maps as ``GPTDataset.__getitem__`` reads them: the shuffle index gives
    a row of the sample index, whose rows ``[r, r+1]`` hold the first and last position in the document
    index and the token offsets there. Two samples are the same when they span the same documents (ids
    of the same underlying file) from the same offset to the same offset, hence the same tokens."""
    if a.dataset_path != b.dataset_path:
        return np.zeros(len(pa), dtype=bool)
    ra = np.asarray(a.shuffle_index[pa], dtype=np.int64)
    rb = np.asarray(b.shuffle_index[pb], dtype=np.int64)
    beg_a, end_a = np.asarray(a.sample_index[ra]), np.asarray(a.sample_index[ra + 1])
    beg_b, end_b = np.asarray(b.sample_index[rb]), np.asarray(b.sample_index[rb + 1])
    spans = end_a[:, 0].astype(np.int64) - beg_a[:, 0] + 1  # documents per sample
    same = (
        (beg_a[:, 1] == beg_b[:, 1])
        & (end_a[:, 1] == end_b[:, 1])
        & (spans == end_b[:, 0].astype(np.int64) - beg_b[:, 0] + 1)
    )
    rows = np.flatnonzero(same)
    if rows.size:  # the document ids along each span
        n = spans[rows]
        step = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        docs_a = np.asarray(a.document_index[np.repeat(beg_a[rows, 0].astype(np.int64), n) + step])
        docs_b = np.asarray(b.document_index[np.repeat(beg_b[rows, 0].astype(np.int64), n) + step])
        same[np.repeat(rows, n)[docs_a != docs_b]] = False
    return same


def _same_bert_samples(a: Any, pa: np.ndarray, b: Any, pb: np.ndarray) -> np.ndarray:
    """Per position: whether sample ``pa[i]`` of a ``bigtrain.data.bert.BertDataset`` ``a`` is sample ``pb[i]``
    of ``b``: the same sentences of the same file (megatron's sample index row) at the same index (which
    seeds the sample's masks and pair)."""
    if a.dataset_path != b.dataset_path:
        return np.zeros(len(pa), dtype=bool)
    rows_a, rows_b = np.asarray(a.sample_index[pa]), np.asarray(b.sample_index[pb])
    return (pa == pb) & (rows_a[:, :2] == rows_b[:, :2]).all(axis=1)


def _same_samples(a: Any, pa: np.ndarray, b: Any, pb: np.ndarray) -> np.ndarray:
    from bigtrain.data.bert import BertDataset

    if isinstance(a, BertDataset) or isinstance(b, BertDataset):
        if not (isinstance(a, BertDataset) and isinstance(b, BertDataset)):
            return np.zeros(len(pa), dtype=bool)
        return _same_bert_samples(a, pa, b, pb)
    return _same_gpt_samples(a, pa, b, pb)


def _members(ds: Any) -> list[Any]:
    """The per-shard megatron datasets under a top-level sample dataset's blend (itself when unblended)."""
    return list(getattr(ds.dataset, "datasets", [ds.dataset]))


def first_changed_sample(saved: Any, new: Any, n: int) -> int | None:
    """The first of samples ``0..n-1`` that ``new`` orders differently from ``saved``, or None.

    Both are the training datasets (:class:`SampleDataset`, or the bert family's ``BertSampleDataset``)
    of one config built for two sample counts. A blend's sample ``i`` is sample ``dataset_sample_index[i]``
    of member ``dataset_index[i]``; the members are compared with :func:`_same_gpt_samples` /
    :func:`_same_bert_samples`. A few samples' tokens are compared as well: identities that agree while the
    tokens do not count as a change."""
    if n <= 0:
        return None
    if min(len(saved), len(new)) < n:
        return min(len(saved), len(new))
    a, b = saved.dataset, new.dataset
    blended = hasattr(a, "dataset_index")
    if blended != hasattr(b, "dataset_index") or len(_members(saved)) != len(_members(new)):
        return 0
    for start in range(0, n, _CHUNK):
        pos = np.arange(start, min(n, start + _CHUNK))
        if not blended:
            same = _same_samples(a, pos, b, pos)
        else:
            member = np.asarray(a.dataset_index[pos])
            same = member == np.asarray(b.dataset_index[pos])
            for d in np.unique(member):
                rows = np.flatnonzero(same & (member == d))
                same[rows] = _same_samples(
                    a.datasets[d],
                    np.asarray(a.dataset_sample_index[pos[rows]]),
                    b.datasets[d],
                    np.asarray(b.dataset_sample_index[pos[rows]]),
                )
        changed = np.flatnonzero(~same)
        if changed.size:
            return start + int(changed[0])
    for i in sorted({0, n - 1, *np.linspace(0, n - 1, _TOKEN_PROBES).astype(int).tolist()}):
        if not torch.equal(saved[i]["tokens"], new[i]["tokens"]) or not torch.equal(
            saved[i]["labels"], new[i]["labels"]
        ):
            return i
    return None


def configured_tokenizer(cfg: Config) -> Any:
    """``data.tokenizer`` loaded (``tokenizer.Tokenizer``: SentencePiece or Hugging Face, per the directory's
    files), or None when it is not set; ConfigError naming the field when it cannot be loaded."""
    if not cfg.data.tokenizer:
        return None
    from tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer.load(cfg.data.tokenizer)
    except (FileNotFoundError, TokenizerError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None


def train_order_change(cfg: Config, saved: int, new: int, n: int | None = None) -> int | None:
    """The first of samples ``0..n-1`` (default ``min(saved, new)``) that megatron's training order built
    for ``new`` samples has differently from the one built for ``saved``, or None when they agree.

    Both are built by :func:`build_datasets` with ``cfg`` (``data.tokenizer`` loaded), so call it on every
    rank of a process group, or in one process before any: megatron caches their index maps, keyed by
    content, and the ``new`` build is the one the run makes anyway. The order changes when megatron's
    number of epochs over the corpus, or whether it shuffles the final epoch apart, changes with the count
    (a corpus of few samples per epoch), and for a blend when a member's does."""
    import copy

    tokenizer = configured_tokenizer(cfg)

    def train(count: int) -> Any:
        c = copy.deepcopy(cfg)
        c.data.train_samples = count
        return build_datasets(c, tokenizer)[0]

    return first_changed_sample(train(saved), train(new), min(saved, new) if n is None else n)
