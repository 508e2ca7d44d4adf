"""Documents cut into sentences, for the bert family's sentence-pair samples (``preprocess --split-sentences``).

megatron-core's BERT sampling (``helpers.build_mapping``) reads a document as a run of sequences, one
per sentence, and cuts segments A and B at sentence boundaries. How a text is cut here:

* at every line break: a line (a paragraph, a heading, a line of code) never continues across one;
* within a line after ``. ! ? …`` (and closing quotes/brackets right after them) followed by
  whitespace, and after the CJK full stops ``。！？`` (no space follows them in CJK text).

Rule-based on purpose: NLTK's punkt (what Megatron-LM's preprocessing uses) needs a model download and
its abbreviation list is English-only. The cost of a false boundary ("e.g. this") is a sentence pair cut
one clause early, which MLM and NSP/SOP tolerate. Each sentence is stripped of surrounding whitespace and
encoded on its own, as a fine-tuning text is (``tokenizer(a, b)`` of two stripped texts), so a pair in
pretraining has the ids the same two sentences have at fine-tuning. A sentence longer than
:data:`MAX_SENTENCE_TOKENS` is cut into pieces of that many tokens: megatron skips every document holding
a longer one (``LONG_SENTENCE_LEN``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

MAX_SENTENCE_TOKENS = 512  # megatron-core helpers.cpp LONG_SENTENCE_LEN
_BOUNDARY = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s+|(?<=[。！？])\s*")


def split_sentences(text: str) -> list[str]:
    """The non-empty, stripped sentences of ``text`` in order (rules in the module doc)."""
    out: list[str] = []
    for line in text.splitlines():
        out.extend(s.strip() for s in _BOUNDARY.split(line))
    return [s for s in out if s]


def encode_sentence_documents(tok: Any, texts: list[bytes], num_threads: int = 1) -> list[list[np.ndarray]]:
    """Each UTF-8 document as its sentences' int32 id arrays: ``tok.encode`` of each sentence, no
    BOS/EOS/EOD and no post-processor ([CLS]/[SEP] are the dataset's to add), long ones cut."""
    docs = [split_sentences(t.decode("utf-8")) for t in texts]
    encoded = iter(tok.encode_batch([s for d in docs for s in d], num_threads=num_threads))
    out: list[list[np.ndarray]] = []
    for doc in docs:
        sentences: list[np.ndarray] = []
        for _ in doc:
            ids = np.asarray(next(encoded), dtype=np.int32)  # empty when a normalizer drops it all
            sentences += [ids[i : i + MAX_SENTENCE_TOKENS] for i in range(0, ids.size, MAX_SENTENCE_TOKENS)]
        out.append(sentences)
    return out
