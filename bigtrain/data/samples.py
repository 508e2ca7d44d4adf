"""What the GPT windows (:mod:`bigtrain.data.datasets`) and the bert family's samples
(:mod:`bigtrain.data.bert`) share on megatron-core's dataset stack: the top-level dataset read by global
sample index, the blend of validated corpora, the config fields taken from ``cfg``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bigtrain.config import Config
from bigtrain.data.validate import Corpus


class MegatronSamples(torch.utils.data.Dataset):
    """A megatron-core top-level dataset (one member, or a ``BlendedDataset`` of several) read by global
    sample index; subclasses give the item format (:class:`SampleDataset`, ``bert.BertSampleDataset``)."""

    def __init__(self, dataset: Any, corpus_of_dataset: Sequence[int], corpora: Sequence[Corpus], split: str):
        self.dataset = dataset
        self.corpus_of_dataset = list(corpus_of_dataset)
        self.corpora = list(corpora)
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, idx: int) -> tuple[dict[str, Any], int]:
        """Megatron's item ``idx`` and the corpus (blend member) it came from; IndexError out of range."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} {self.split} samples")
        item = self.dataset[idx]
        dataset_id = int(item.get("dataset_id", 0))
        return item, self.corpus_of_dataset[dataset_id] if self.corpus_of_dataset else 0


def blend_members(corpora: Sequence[Corpus]) -> tuple[list[str], list[float] | None, list[int]]:
    """Flatten corpora to megatron's (prefixes, weights) and the corpus index of every prefix.

    A corpus weight is split over its shards in proportion to their token counts, so the corpus keeps
    its share of the mix however it is sharded; empty shards are left out (megatron needs weights > 0).
    Unweighted corpora (a single name, or ``data.valid``) are weighted by size.
    """
    total = sum(c.num_tokens for c in corpora)
    prefixes, weights, corpus_of = [], [], []
    for i, corpus in enumerate(corpora):
        share = corpus.weight if corpus.weight is not None else corpus.num_tokens / total
        for shard in corpus.shards:
            if shard.num_tokens:
                prefixes.append(shard.prefix)
                weights.append(share * shard.num_tokens / corpus.num_tokens)
                corpus_of.append(i)
    if len(prefixes) == 1:
        return prefixes, None, corpus_of
    return prefixes, weights, corpus_of


def dataset_options(cfg: Config, info: Any, path_to_cache: str | None) -> dict[str, Any]:
    """The megatron dataset config fields every family sets from ``cfg``: seed, length, cache, tokenizer."""
    return dict(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        path_to_cache=path_to_cache,
        tokenizer=info,
        mmap_bin_files=True,
    )
