"""The bert family's pretraining samples: masked tokens (MLM) and a sentence pair (NSP / SOP).

Built on megatron-core's masked-dataset base, ``masked_dataset.MaskedWordPieceDataset``: the sample
index (``helpers.build_mapping``: runs of whole sentences of one document, each with a target length that
``data.masking.short_seq_prob`` shortens), its cache files, the train/valid split by document and blending
through ``BlendedMegatronDatasetBuilder`` are megatron's. The data is ``tokenizer.preprocess
--split-sentences`` output: one sequence per sentence, a document a run of them.

Why not megatron's ``BERTMaskedWordPieceDataset`` itself (tried first, on CPU with our indexed data; it
runs, but it is not BERT's sampling for our tokenizers):

* its "next sentence" label is SOP's: B is always A's continuation, swapped in half the samples
  (``is_random`` means swapped). BERT's NSP draws B from a random document; that is here;
* whole-word masking reads WordPiece's ``##`` continuation mark from ``tokenizer.inv_vocab`` and joins a
  segment's first piece to the word before the ``[SEP]``; bigtrain's SentencePiece tokenizers mark word
  starts with ``▁`` and start every sentence without one (no dummy prefix), so word starts come from
  :class:`BertTokenizerInfo` (either convention) and every sentence start;
* 80/10/10 is hard-coded (``_get_token_mask``), the random replacement may draw ``[CLS]``/``[PAD]``,
  labels are -1 where nothing is predicted (megatron's vocab-parallel cross entropy needs valid ids)
  and padding token types are the pad id.

So :class:`BertDataset` keeps the base and writes ``__getitem__``, its masking shaped like megatron's
``_create_masked_lm_predictions`` with 1-grams: ``round(prob * tokens)`` (at least 1; the tokens of A and
B, specials never) positions taken as whole candidates (words, or single tokens) in a shuffled order,
skipping a word that would overshoot, then per position [MASK] / a random id / kept by
``mask_fraction`` / ``random_fraction``. Truncation trims the longer segment from a random end until
the pair fits ``seq_length`` (BERT's ``truncate_seq_pair``; megatron trims to the sample's target
length; here a short target, ``short_seq_prob``, still shortens a sample: ``build_mapping`` stops
gathering sentences there). Everything random in a
sample comes from ``numpy.random.RandomState([train.seed, index])``, as megatron seeds one per index: a
sample is a pure function of the seed, the data, its index and megatron's sample index (which the
sample count shapes, as for GPT: ``data.train_samples`` pins it), so resume and any data-parallel
layout see the same samples.

Item (each a torch tensor of length ``seq_length`` unless noted): ``tokens`` int64, ``token_types``
int64 (0 for ``[CLS]`` A ``[SEP]`` and padding, 1 for B ``[SEP]``), ``attention_mask`` int64 (1 real, 0
padding), ``labels`` int64 (the original id where predicted, the pad id elsewhere), ``loss_mask`` float32
(1 where predicted), ``nsp_labels`` 0-dim int64 (nsp: 0 B follows A, 1 B is random, as HF's
``next_sentence_label``; sop: 1 swapped; none: 0), ``sample_id`` int, ``corpus_id`` int.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.masked_dataset import MaskedWordPieceDataset, MaskedWordPieceDatasetConfig
from megatron.core.datasets.utils import Split

from bigtrain import compat
from bigtrain.config import Config
from bigtrain.data.corpus import DataError
from bigtrain.data.samples import MegatronSamples, blend_members, dataset_options
from bigtrain.data.validate import Corpus

LONG_SENTENCE = 512  # megatron helpers.cpp LONG_SENTENCE_LEN: a document holding a longer one is skipped
# the mock data's ids without a tokenizer: tokenizer.train --bert-specials' layout
MOCK_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "cls": 4, "sep": 5, "mask": 6}


class BertTokenizerInfo:
    """What a bert sample needs of the tokenizer: the special ids, which ids start a word, which ids a
    random replacement may draw. Picklable, and part of megatron's cache key (``unique_identifiers``).

    Word starts: WordPiece vocabularies (pieces ``##x``, none ``▁x``) continue a word with ``##``;
    otherwise (SentencePiece) a piece starting with ``▁`` starts one. Random replacements are every id
    with a token except the named special ones (cls, sep, mask, pad, unk, bos, eos).
    """

    def __init__(
        self,
        vocab_size: int,
        cls: int,
        sep: int,
        mask: int,
        pad: int,
        word_start: np.ndarray,
        random_ids: np.ndarray,
        fingerprint: str | None = None,
    ):
        self.vocab_size, self.cls, self.sep, self.mask, self.pad = vocab_size, cls, sep, mask, pad
        self.word_start = np.asarray(word_start, dtype=bool)
        self.random_ids = np.asarray(random_ids, dtype=np.int64)
        self.unique_identifiers = {
            "class": type(self).__name__,
            "vocab_size": vocab_size,
            "ids": [cls, sep, mask, pad],
            "fingerprint": fingerprint,
        }

    @staticmethod
    def require(tokenizer: Any) -> None:
        """DataError naming the tokenizer's directory (and how to add them) when BERT's specials are missing."""
        from tokenizer import bert_specials_hint

        missing = tokenizer.missing_bert_specials()
        if missing:
            raise DataError(f"data.tokenizer: {bert_specials_hint(tokenizer, missing)}")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> BertTokenizerInfo:
        """From a ``tokenizer.Tokenizer``; DataError as :meth:`require`."""
        cls.require(tokenizer)
        pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        wordpiece = any(p.startswith("##") for p in pieces) and not any(p.startswith("▁") for p in pieces)
        starts = np.array([not p.startswith("##") if wordpiece else p.startswith("▁") for p in pieces])
        named = {tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id}
        named |= {i for i in (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) if i >= 0}
        random_ids = [i for i, p in enumerate(pieces) if p and i not in named]
        return cls(
            tokenizer.vocab_size,
            tokenizer.cls_id,
            tokenizer.sep_id,
            tokenizer.mask_id,
            tokenizer.pad_id,
            starts,
            np.array(random_ids),
            tokenizer.fingerprint,
        )

    @classmethod
    def mock(cls, vocab_size: int) -> BertTokenizerInfo:
        """Without a tokenizer (``data.mock``): :data:`MOCK_IDS`, every id a word start."""
        if vocab_size <= len(MOCK_IDS):
            raise DataError(f"data.mock: model.vocab_size {vocab_size} leaves no ids besides BERT's specials")
        i = MOCK_IDS
        return cls(
            vocab_size,
            i["cls"],
            i["sep"],
            i["mask"],
            i["pad"],
            np.ones(vocab_size, dtype=bool),
            np.arange(len(MOCK_IDS), vocab_size),
        )

    def __repr__(self) -> str:
        return f"BertTokenizerInfo({self.unique_identifiers})"


@dataclass
class BertDatasetConfig(MaskedWordPieceDatasetConfig):
    """megatron's masked-dataset config plus ``data.masking``'s split of the predictions and pair mode."""

    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    sentence_pair: str = "nsp"


class MockSentenceDocuments:
    """``data.mock``'s low-level dataset: 20000 documents of 2-12 sentences of 4-64 random ids, each
    sentence a pure function of its index; shaped like megatron's ``IndexedDataset`` where read."""

    num_documents = 20_000

    def __init__(self, info: BertTokenizerInfo):
        rng = np.random.RandomState(0)
        counts = rng.randint(2, 13, size=self.num_documents)
        self.document_indices = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.sequence_lengths = rng.randint(4, 65, size=int(counts.sum())).astype(np.int32)
        self.random_ids = info.random_ids

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.RandomState([1, int(i)])
        return self.random_ids[rng.randint(0, len(self.random_ids), size=int(self.sequence_lengths[i]))]


class BertDataset(MaskedWordPieceDataset):
    """BERT samples from sentence-split documents (see module doc); built by megatron's builder."""

    def __init__(
        self,
        indexed_dataset: Any,
        dataset_path: str | None,
        indexed_indices: np.ndarray,
        num_samples: int | None,
        index_split: Split,
        config: BertDatasetConfig,
    ) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.info: BertTokenizerInfo = config.tokenizer
        self.pair = config.sentence_pair != "none"
        self.room = config.sequence_length - (3 if self.pair else 2)  # tokens of A and B
        self._check_documents(dataset_path or "data.mock", indexed_indices)
        self.sample_index = self._build_sample_index(self.room, 2 if self.pair else 1)

    def _check_documents(self, where: str, indices: np.ndarray) -> None:
        """megatron's sampling loops forever (epoch after empty epoch) when no document qualifies."""
        bounds = np.asarray(self.dataset.document_indices)
        starts, ends = bounds[indices], bounds[indices + 1]
        need = 2 if self.pair else 1
        starts, ends = starts[ends > starts], ends[ends > starts]
        # the split's documents are consecutive: each maximum runs from its start to the next one's
        lengths = np.asarray(self.dataset.sequence_lengths)[: ends[-1] if ends.size else 0]
        longest = np.maximum.reduceat(lengths, starts) if starts.size else np.zeros(0)
        usable = (ends - starts >= need) & (longest <= LONG_SENTENCE)
        part = self.index_split.name
        if not usable.any():
            why = f"no document of its {part} part has {need} or more sentences of at most {LONG_SENTENCE} tokens"
            fix = (
                "write it with `python -m tokenizer.preprocess ... --split-sentences`"
                if self.pair
                else "check the data"
            )
            raise DataError(f"{where}: {why} (data.masking.sentence_pair {self.config.sentence_pair}); {fix}")
        if self.config.sentence_pair == "nsp" and starts.size < 2:
            raise DataError(f"{where}: NSP draws B from another document; its {part} part has one at most")
        self._doc_bounds = bounds

    def _build_sample_index(self, sequence_length: int, min_sentences_per_sample: int) -> np.ndarray:
        if not self.config.mock:  # real data: megatron's, cached under path_to_cache
            return super()._build_sample_index(sequence_length, min_sentences_per_sample)
        from megatron.core.datasets import helpers

        return helpers.build_mapping(
            self.dataset.document_indices[np.append(self.indices, self.indices[-1] + 1)],
            self.dataset.sequence_lengths,
            np.iinfo(np.int32).max - 1,
            self.num_samples,
            sequence_length,
            self.config.short_sequence_probability,
            self.config.random_seed,
            False,
            min_sentences_per_sample,
        )

    @staticmethod
    def build_low_level_dataset(dataset_path: str | None, config: Any) -> Any:
        if dataset_path is None:
            return MockSentenceDocuments(config.tokenizer)
        return MaskedWordPieceDataset.build_low_level_dataset(dataset_path, config)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [
            *MaskedWordPieceDataset._key_config_attributes(),
            "mask_fraction",
            "random_fraction",
            "sentence_pair",
        ]

    # ------------------------------------------------------------------------------------ a sample
    def _sentences(self, first: int, last: int) -> list[np.ndarray]:
        return [np.asarray(self.dataset[i], dtype=np.int64) for i in range(first, last)]

    def _other_document(self, rng: np.random.RandomState, avoid: int) -> int:
        """A random non-empty document of this split other than ``avoid`` (the split has two or more)."""
        bounds = self._doc_bounds
        for _ in range(10):
            doc = int(self.indices[rng.randint(len(self.indices))])
            if doc != avoid and bounds[doc + 1] > bounds[doc]:
                return doc
        # rare (few non-empty documents): the next one after ``avoid`` in document order
        ok = self.indices[(bounds[self.indices + 1] > bounds[self.indices]) & (self.indices != avoid)]
        return int(ok[np.searchsorted(ok, avoid) % len(ok)])

    def _random_segment(self, rng: np.random.RandomState, avoid: int, length: int) -> list[np.ndarray]:
        """Sentences from a random other document of this split, from a random sentence on, until
        ``length`` tokens (BERT's NSP negative)."""
        doc = self._other_document(rng, avoid)
        first, last = int(self._doc_bounds[doc]), int(self._doc_bounds[doc + 1])
        start = rng.randint(first, last)
        out, total = [], 0
        for sentence in self._sentences(start, last):
            out.append(sentence)
            total += sentence.size
            if total >= length:
                break
        return out

    def _segments(
        self, idx: int, rng: np.random.RandomState
    ) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """Segments A and B (lists of sentences) and the pair label of sample ``idx``."""
        first, last, _target = (int(x) for x in self.sample_index[idx])
        sentences = self._sentences(first, last)
        if not self.pair:
            return sentences, [], 0
        pivot = 1 if len(sentences) < 3 else rng.randint(1, len(sentences))
        a, b = sentences[:pivot], sentences[pivot:]
        label = int(rng.random_sample() < 0.5)
        if label and self.config.sentence_pair == "nsp":
            doc = int(np.searchsorted(self._doc_bounds, first, side="right")) - 1
            b = self._random_segment(rng, doc, max(1, self.room - sum(s.size for s in a)))
        elif label:  # sop: the same two segments, swapped
            a, b = b, a
        return a, b, label

    def _truncate(
        self, a: list[np.ndarray], b: list[np.ndarray], rng: np.random.RandomState
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each segment's ids and sentence-start flags, the longer trimmed from a random end until both fit."""
        ids, starts, cuts = [], [], []
        for segment in (a, b):
            tokens = np.concatenate(segment) if segment else np.zeros(0, dtype=np.int64)
            flags = np.zeros(tokens.size, dtype=bool)
            at = np.cumsum([0] + [s.size for s in segment[:-1]]).astype(np.int64)
            flags[at[at < tokens.size]] = True  # (an empty sentence starts nothing)
            ids.append(tokens)
            starts.append(flags)
            cuts.append([0, tokens.size])
        while cuts[0][1] - cuts[0][0] + cuts[1][1] - cuts[1][0] > self.room:
            k = 0 if cuts[0][1] - cuts[0][0] > cuts[1][1] - cuts[1][0] else 1
            if rng.random_sample() < 0.5:
                cuts[k][0] += 1
            else:
                cuts[k][1] -= 1
        (a0, a1), (b0, b1) = cuts
        return ids[0][a0:a1], starts[0][a0:a1], ids[1][b0:b1], starts[1][b0:b1]

    def _mask(self, tokens: np.ndarray, word_start: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        """Predicted positions (sorted) of ``tokens``, never a special id; whole words chosen together
        when ``masking_do_full_word`` (``word_start`` marks each word's first token)."""
        info = self.info
        real = np.flatnonzero(~np.isin(tokens, [info.cls, info.sep, info.mask, info.pad]))
        if self.config.masking_do_full_word:
            word = np.cumsum(word_start[real])
            word -= word[0] if word.size else 0
        else:
            word = np.arange(real.size)
        word_sizes = np.bincount(word)
        want = max(1, int(round(real.size * self.config.masking_probability)))
        chosen, count = [], 0
        for w in rng.permutation(word_sizes.size):
            if count + word_sizes[w] <= want:
                chosen.append(w)
                count += int(word_sizes[w])
                if count == want:
                    break
        return np.sort(real[np.isin(word, chosen)])

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = int(idx)
        rng = np.random.RandomState([self.config.random_seed % 2**32, idx])
        a, b, label = self._segments(idx, rng)
        ids_a, start_a, ids_b, start_b = self._truncate(a, b, rng)
        info, s = self.info, self.config.sequence_length
        # the candidates: A then B, each segment's first token a word start (it follows [CLS]/[SEP])
        body = np.concatenate([ids_a, ids_b])
        start = np.concatenate([start_a, start_b]) | info.word_start[body]
        start[[0, ids_a.size] if ids_b.size else [0]] = True
        predicted = self._mask(body, start, rng)
        decision = rng.random_sample(predicted.size)
        masked = body.copy()
        masked[predicted[decision < self.config.mask_fraction]] = info.mask
        replace = predicted[
            (decision >= self.config.mask_fraction)
            & (decision < self.config.mask_fraction + self.config.random_fraction)
        ]
        masked[replace] = info.random_ids[rng.randint(0, len(info.random_ids), size=replace.size)]
        # [CLS] A [SEP] (B [SEP]): body position p sits at 1 + p in A, 2 + p in B
        at = np.arange(body.size) + 1 + (np.arange(body.size) >= ids_a.size)
        n = body.size + (3 if ids_b.size else 2)
        tokens = np.full(s, info.pad, dtype=np.int64)
        tokens[0], tokens[ids_a.size + 1], tokens[n - 1] = info.cls, info.sep, info.sep
        tokens[at] = masked
        types = np.zeros(s, dtype=np.int64)
        types[ids_a.size + 2 : n] = 1 if ids_b.size else 0
        labels = np.full(s, info.pad, dtype=np.int64)
        labels[at[predicted]] = body[predicted]
        loss_mask = np.zeros(s, dtype=np.float32)
        loss_mask[at[predicted]] = 1.0
        attention = np.zeros(s, dtype=np.int64)
        attention[:n] = 1
        return {
            "tokens": torch.from_numpy(tokens),
            "token_types": torch.from_numpy(types),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "nsp_labels": torch.tensor(label, dtype=torch.int64),
        }

    def _get_token_mask(self, numpy_random_state: np.random.RandomState) -> int | None:
        raise NotImplementedError("BertDataset masks in __getitem__ (see the module doc)")


class BertSampleDataset(MegatronSamples):
    """A megatron top-level dataset of :class:`BertDataset` samples (one, or a ``BlendedDataset`` of
    several); items as the module doc says, ``sample_id`` the index asked for, ``corpus_id`` its blend
    member."""

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = int(idx)
        item, corpus = self.read(idx)
        out = {k: v for k, v in item.items() if k != "dataset_id"}
        return {**out, "sample_id": idx, "corpus_id": corpus}


def bert_config(
    cfg: Config, info: BertTokenizerInfo, path_to_cache: str | None, **blend: Any
) -> BertDatasetConfig:
    """The megatron dataset config of ``cfg``'s bert samples (``blend``: megatron's blend/split fields)."""
    k = cfg.data.masking
    return BertDatasetConfig(
        **dataset_options(cfg, info, path_to_cache),
        masking_probability=k.prob,
        short_sequence_probability=k.short_seq_prob,
        masking_max_ngram=1,
        masking_do_full_word=k.whole_word,
        masking_do_permutation=False,
        masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False,
        mask_fraction=k.mask_fraction,
        random_fraction=k.random_fraction,
        sentence_pair=k.sentence_pair,
        **blend,
    )


def build_bert(
    cfg: Config,
    tokenizer: Any,
    sizes: list[int | None],
    corpora: tuple[list[Corpus], list[Corpus] | None] | None,
    path_to_cache: str | None,
) -> tuple[BertSampleDataset, BertSampleDataset | None]:
    """(train, valid) bert samples: mock ones (``corpora`` None) or from validated corpora."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    if tokenizer is not None:
        info = BertTokenizerInfo.from_tokenizer(tokenizer)
    elif corpora is None and cfg.model.vocab_size:
        info = BertTokenizerInfo.mock(cfg.model.vocab_size)
    else:
        raise DataError(
            "data.tokenizer: the bert family's samples need the tokenizer ([CLS]/[SEP]/[MASK] ids and word "
            "starts); set data.tokenizer" + ("" if corpora is not None else " or model.vocab_size")
        )
    if corpora is None:  # megatron: no blend means mock, split "1,1,1" of the mock documents
        config = bert_config(cfg, info, None)
        train_corpora: list[Corpus] = []
        valid_corpora: list[Corpus] | None = []
        train_of: list[int] = []
        valid_of: list[int] = []
    else:
        train_corpora, valid_corpora = corpora
        train_prefixes, train_weights, train_of = blend_members(train_corpora)
        if valid_corpora is not None:
            valid_prefixes, valid_weights, valid_of = blend_members(valid_corpora)
            blend_per_split = [(train_prefixes, train_weights), (valid_prefixes, valid_weights), None]
            config = bert_config(cfg, info, path_to_cache, blend_per_split=blend_per_split)
        else:
            valid_corpora, valid_of = train_corpora, train_of
            config = bert_config(
                cfg, info, path_to_cache, blend=(train_prefixes, train_weights), split=cfg.data.split
            )
    builder = BlendedMegatronDatasetBuilder(BertDataset, sizes, lambda: True, config)
    with compat.single_process_rank():  # masked_dataset calls get_rank() on a cache miss, as blended does
        train_ds, valid_ds, _ = builder.build()
    train = BertSampleDataset(train_ds, train_of, train_corpora, "train")
    valid = (
        BertSampleDataset(valid_ds, valid_of, valid_corpora or [], "valid") if valid_ds is not None else None
    )
    return train, valid
