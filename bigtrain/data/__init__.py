"""Training data for bigtrain: megatron-core indexed datasets in, per-rank micro-batches out.

- :func:`build_datasets` — (train, valid) sample datasets from ``cfg.data`` (prefix, shards, glob or a
  weighted blend), validated first and built on megatron-core's ``GPTDataset``/``BlendedDataset``.
- :func:`batch_iterator` / :class:`MicroBatchSampler` — each data-parallel rank's slice of every global
  batch; the resume state is the global count of consumed samples.
- :class:`SequentialWindows` — unshuffled fixed windows for evaluation.
- :func:`validate_data` / :class:`DataError` — one-line errors naming the bad file.

For ``model.family: bert``, :func:`build_datasets` returns :mod:`bigtrain.data.bert`'s MLM + NSP/SOP
samples instead (from ``tokenizer.preprocess --split-sentences`` data); that module imports megatron-core,
so it is not imported here.
"""

from bigtrain.data.corpus import DataError, parse_blend, resolve_corpus
from bigtrain.data.datasets import (
    SampleDataset,
    SequentialWindows,
    TokenizerInfo,
    build_datasets,
    num_evaluations,
    num_samples,
)
from bigtrain.data.sampler import BatchIterator, MicroBatchSampler, batch_iterator, collate
from bigtrain.data.validate import Corpus, ShardInfo, check_same_tokenizer, validate_data

__all__ = [
    "BatchIterator",
    "Corpus",
    "DataError",
    "MicroBatchSampler",
    "SampleDataset",
    "SequentialWindows",
    "ShardInfo",
    "TokenizerInfo",
    "batch_iterator",
    "build_datasets",
    "check_same_tokenizer",
    "collate",
    "num_evaluations",
    "num_samples",
    "parse_blend",
    "resolve_corpus",
    "validate_data",
]
