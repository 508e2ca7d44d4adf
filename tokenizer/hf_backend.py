"""A Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``) behind
:class:`tokenizer.Tokenizer`: what an imported Llama 3, Qwen2/3, Mistral or Gemma model ships with.

Ids equal ``AutoTokenizer.from_pretrained(dir)``'s (transformers 5), read with the ``tokenizers``
library alone (no transformers import), by following what transformers' ``TokenizersBackend``
does with the two files:

* the pipeline (normalizer, pre-tokenizer, model, decoder) is ``tokenizer.json``'s. transformers
  rebuilds it for classes with their own pipeline (``Qwen2Tokenizer``, ``LlamaTokenizer``, ...) from
  the same vocabulary; official files agree with their class, and :func:`verify_parity`, which
  ``tokenizer.preprocess`` runs before writing anything, catches files that do not;
* special tokens: ``bos_token``/``eos_token``/``unk_token``/``pad_token`` of
  ``tokenizer_config.json`` (else ``special_tokens_map.json``), as strings or ``{"content": ...}``;
  one absent or ``null`` has id -1 (Qwen has no BOS, Llama 3 no pad); likewise BERT's ``cls_token`` /
  ``sep_token`` / ``mask_token``, None when absent. transformers adds a named
  token missing from the vocabulary with a new id; that is refused here instead (the file is named);
  the named and extra special tokens are registered as special added tokens, as transformers does;
* BOS/EOS added to a text (``tokenizer(text)``): ``tokenizer.json``'s post-processor (Llama 3's
  ``<|begin_of_text|> $A``, Mistral's ``<s> $A``; Qwen's adds nothing), nothing without one. The
  config's ``add_bos_token`` / ``add_eos_token`` are ignored, as transformers 5 ignores them beside a
  ``tokenizer.json``;
* ``split_special_tokens`` (default false: a special token's string in text is that token).

A dataset document is ``tokenizer(text)["input_ids"]`` then EOD (the EOS, ``<|end_of_text|>`` for
Llama 3 base, ``<|endoftext|>`` for Qwen base), unless the post-processor already ends it with EOD.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokenizer import HF_TOKENIZER_FILE, Tokenizer, TokenizerError

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
NAMED_SPECIAL = ("bos", "eos", "unk", "pad")
BERT_NAMED = ("cls", "sep", "mask")  # BERT's (bert-base-uncased's [CLS]/[SEP]/[MASK]); None when unnamed


def _content(value: Any, where: str) -> str | None:
    """A special-token entry's string: a str, ``{"content": str, ...}`` (AddedToken) or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a string or {{'content': ...}}, got {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return obj


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` set up as transformers loads the directory (see module doc)."""

    kind = "huggingface"

    def __init__(self, directory: Path) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        self._dir = directory
        self._json = directory / HF_TOKENIZER_FILE
        raw = self._json.read_bytes()
        try:
            self._tok = Backend.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"{self._json}: not a Hugging Face tokenizers file ({e})") from None
        # transformers truncates or pads only when a call asks for it; a tokenizer.json that ships with
        # truncation on would otherwise cut every document silently
        self._tok.no_truncation()
        self._tok.no_padding()
        config_file = directory / CONFIG_FILE
        config = _read_json(config_file)
        special_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
        self._tokens: dict[str, str | None] = {}
        self._ids: dict[str, int] = {}
        self._bert_ids: dict[str, int | None] = {}
        for name in NAMED_SPECIAL + BERT_NAMED:
            key = f"{name}_token"
            where = (
                f"{config_file} {key}" if key in config else f"{directory / SPECIAL_TOKENS_MAP_FILE} {key}"
            )
            token = _content(config[key] if key in config else special_map.get(key), where)
            self._tokens[name] = token
            if name in BERT_NAMED:  # kept out of the fingerprint's ids: documents' ids do not use them
                self._bert_ids[name] = None if token is None else self._id_of(token, where)
            else:
                self._ids[name] = self._id_of(token, where)
        for id_text, entry in (config.get("added_tokens_decoder") or {}).items():
            where = f"{config_file} added_tokens_decoder[{id_text}]"
            token = _content(entry, where)
            if token is not None and self._tok.token_to_id(token) != int(id_text):
                raise TokenizerError(
                    f"{where}: {token!r} has id {self._tok.token_to_id(token)} in {self._json}; re-save the "
                    "tokenizer with transformers' save_pretrained so both files agree"
                )
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # transformers 5 also accepts {name: token}
            extra = list(extra.values())
        extra_tokens = [_content(t, f"{config_file} extra_special_tokens") for t in extra]
        for token in extra_tokens:
            self._id_of(token, f"{config_file} extra_special_tokens")
        specials = [t for t in [*self._tokens.values(), *extra_tokens] if t is not None]
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

        self._split = bool(config.get("split_special_tokens", False))
        self._tok.encode_special_tokens = self._split

        # the ids the post-processor puts around a text, found on a probe (a template adds fixed ids).
        # transformers 5 drops the config's add_bos_token/add_eos_token beside a tokenizer.json: its
        # post-processor alone decides, and without one nothing is added
        probe = "a"
        inner = self._tok.encode(probe, add_special_tokens=False).ids
        outer = self._tok.encode(probe, add_special_tokens=True).ids
        at = next((i for i in range(len(outer) - len(inner) + 1) if outer[i : i + len(inner)] == inner), None)
        if at is None:
            raise TokenizerError(
                f"{self._json}: the post-processor changes the text's own ids; not supported"
            )
        self._prefix, self._suffix = outer[:at], outer[at + len(inner) :]

        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        settings = {
            "ids": self._ids,
            "specials": sorted(specials),
            "prefix": self._prefix,
            "suffix": self._suffix,
            "split_special_tokens": self._split,
        }
        # tokenizer.json decides the ids, the config only through these settings: a chat template
        # stored in tokenizer_config.json leaves the fingerprint (and so the datasets) alone
        digest = hashlib.sha256(raw)
        digest.update(b"\0" + json.dumps(settings, sort_keys=True).encode())
        self._fingerprint = digest.hexdigest()

    def _id_of(self, token: str | None, where: str) -> int:
        if token is None:
            return -1
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(
                f"{where}: {token!r} is not a token of {self._json} (transformers would add it with a new id "
                "at every load); re-save the tokenizer with transformers' save_pretrained"
            )
        return int(i)

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> HFTokenizer:
        """From a directory holding ``tokenizer.json`` or from that file; FileNotFoundError if absent."""
        p = Path(path)
        directory = p if p.is_dir() else p.parent
        if not (directory / HF_TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"tokenizer not found: {directory} has no {HF_TOKENIZER_FILE}")
        return cls(directory.resolve())

    # -- encoding -------------------------------------------------------------------------------

    def _add(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids.insert(0, self._require("bos"))
        if add_eos:
            ids.append(self._require("eos"))
        return ids

    def _require(self, name: str) -> int:
        if self._ids[name] < 0:
            raise TokenizerError(f"{self._dir / CONFIG_FILE}: the tokenizer has no {name}_token")
        return self._ids[name]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of one text, no post-processor (BOS/EOS only when asked; TokenizerError if absent)."""
        return self._add(self._tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(
        self, texts: list[str], add_bos: bool = False, add_eos: bool = False, num_threads: int = 0
    ) -> list[list[int]]:
        """:meth:`encode` of many texts on the ``tokenizers`` Rust thread pool (GIL released; its size is
        ``RAYON_NUM_THREADS``, so ``num_threads`` is not used)."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._add(e.ids, add_bos, add_eos) for e in encodings]

    def encode_documents(self, texts: list[bytes]) -> list[Any]:
        """``tokenizer(text)["input_ids"]`` then EOD (unless the post-processor already ends with it)."""
        eod = [] if self._suffix[-1:] == [self.eod_id] else [self.eod_id]
        encodings = self._tok.encode_batch_fast([t.decode("utf-8") for t in texts], add_special_tokens=True)
        return [np.array(e.ids + eod, dtype=np.int32) for e in encodings]

    def encode_as_hf(self, text: str) -> list[int]:
        """``AutoTokenizer.from_pretrained(dir)(text)["input_ids"]``."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int] | Any) -> str:
        """The exact inverse of :meth:`encode`: special tokens kept as text, no clean-up of spaces
        (``AutoTokenizer.decode(ids, clean_up_tokenization_spaces=False)``)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=False)

    # -- identity -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Largest id + 1 over the vocabulary and added tokens (``len(AutoTokenizer)`` when contiguous)."""
        return self._vocab_size

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        """The pad token's id, -1 when there is none (datasets and SFT then pad with ids never trained on)."""
        return self._ids["pad"]

    @property
    def eod_id(self) -> int:
        """End-of-document token appended to every dataset document: the EOS; TokenizerError without one."""
        return self._require("eos")

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    @property
    def add_bos(self) -> bool:
        """Whether ``tokenizer(text)`` starts with BOS (Llama 3: yes; Qwen: no)."""
        return self._ids["bos"] >= 0 and self._prefix[:1] == [self._ids["bos"]]

    @property
    def model_path(self) -> Path:
        return self._json

    @property
    def fingerprint(self) -> str:
        """sha256 of tokenizer.json's bytes and the id settings taken from the config (see __init__)."""
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({str(self._dir)!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id}, fingerprint={self._fingerprint[:12]})"
        )


def verify_parity(tok: HFTokenizer, texts: Sequence[str]) -> int:
    """Compare ``tok`` with ``AutoTokenizer.from_pretrained(tok.dir)`` on ``texts`` (ids with BOS/EOS by
    the files' rules, the four named special ids, the vocabulary size); returns the texts checked.

    Raises :class:`tokenizer.hf.ParityError` describing the first difference. Costs a transformers
    import (seconds), so it runs once per preprocessing run, not per load.
    """
    from transformers import AutoTokenizer

    from tokenizer.hf import ParityError

    hf = AutoTokenizer.from_pretrained(str(tok.dir))
    for name in NAMED_SPECIAL + BERT_NAMED:
        theirs = getattr(hf, f"{name}_token_id")
        ours = getattr(tok, f"{name}_id")
        if (-1 if theirs is None and name in NAMED_SPECIAL else theirs) != ours:
            raise ParityError(
                f"{tok.dir}: transformers reads {name}_token as id {theirs}, bigtrain as {ours}; name it in "
                f"{CONFIG_FILE} (transformers' {type(hf).__name__} has its own default)"
            )
    if len(hf) > tok.vocab_size:
        raise ParityError(f"{tok.dir}: transformers has {len(hf)} tokens, bigtrain {tok.vocab_size}")
    texts = list(texts)
    for text, theirs in zip(texts, hf(texts)["input_ids"]):
        ours = tok.encode_as_hf(text)
        if ours != theirs:
            at = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs))
            )
            raise ParityError(
                f"{tok.dir}: bigtrain's ids differ from transformers' {type(hf).__name__} on {text[:80]!r} "
                f"at token {at}: bigtrain={ours[at : at + 8]} transformers={theirs[at : at + 8]}"
            )
    return len(texts)
