"""bigtrain tokenizer: one tokenizer shared by data preprocessing, training and HF export.

Every part of bigtrain talks to the tokenizer through :class:`Tokenizer` so that ids, special tokens
and the end-of-document convention cannot drift apart between the dataset and the model.
:meth:`Tokenizer.load` picks the backend from the directory's files (:func:`tokenizer_kind`):

* ``sentencepiece`` (:class:`SentencePieceTokenizer`): a ``python -m tokenizer.train`` directory
  (``tokenizer.model`` + ``bigtrain_tokenizer.json``), a bare ``tokenizer.model``, or the ``.model``
  file itself. Id convention of models trained by ``tokenizer.train``: unk=0, bos=1, eos=2, pad=3,
  and ``eod_id == eos_id`` (the token appended after every document in a preprocessed dataset);
* ``huggingface`` (:class:`tokenizer.hf_backend.HFTokenizer`): any other directory with a
  ``tokenizer.json``, as shipped with Llama 3, Qwen2/3, Mistral, Gemma (byte-level BPE or
  SentencePiece-style pipelines alike): ids equal ``AutoTokenizer.from_pretrained(dir)``'s.

Importing this package is deliberately cheap: ``sentencepiece`` / ``tokenizers`` are imported on first
:meth:`Tokenizer.load`, and torch / transformers / megatron are never imported here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL_FILE = "tokenizer.model"
META_FILE = "bigtrain_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
BERT_SPECIALS = ("[CLS]", "[SEP]", "[MASK]")  # the bert family's ([PAD]: the tokenizer's own pad)
# what an export carries of a tokenizer directory, byte for byte (HF's files, bigtrain's record)
EXPORT_FILES = (
    MODEL_FILE,
    HF_TOKENIZER_FILE,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    META_FILE,
)

__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "TokenizerError",
    "MODEL_FILE",
    "META_FILE",
    "HF_TOKENIZER_FILE",
    "EXPORT_FILES",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "BERT_SPECIALS",
    "bert_specials_hint",
    "export_files",
    "resolve_model_path",
    "tokenizer_kind",
]


class TokenizerError(ValueError):
    """A tokenizer directory's files cannot be used as they are; the message names the file."""


def tokenizer_kind(path: str | os.PathLike) -> str | None:
    """``"sentencepiece"``, ``"huggingface"`` or None (no tokenizer there) for a directory or file.

    A directory written by ``tokenizer.train`` also holds HF files, but its ``bigtrain_tokenizer.json``
    keeps it on SentencePiece, as before; a foreign directory with a ``tokenizer.json`` (an imported
    model's, SentencePiece-based ones such as Mistral's included) is read as Hugging Face reads it.
    """
    p = Path(path)
    if p.is_file():
        return "huggingface" if p.name == HF_TOKENIZER_FILE else "sentencepiece"
    if not p.is_dir():
        return None
    if (p / MODEL_FILE).is_file() and ((p / META_FILE).is_file() or not (p / HF_TOKENIZER_FILE).is_file()):
        return "sentencepiece"
    return "huggingface" if (p / HF_TOKENIZER_FILE).is_file() else None


def resolve_model_path(dir_or_model_path: str | os.PathLike) -> Path:
    """``DIR/tokenizer.model`` for a directory, the path itself otherwise; FileNotFoundError if absent.

    The error message is a single line so CLIs can print it as is.
    """
    path = Path(dir_or_model_path)
    model = path / MODEL_FILE if path.is_dir() else path
    if not model.is_file():
        where = f"{path} has no {MODEL_FILE}" if path.is_dir() else f"{path} does not exist"
        raise FileNotFoundError(f"tokenizer not found: {where}")
    return model


class Tokenizer(ABC):
    """What bigtrain needs of a tokenizer; :meth:`load` returns the backend a directory holds.

    Ids that a tokenizer does not define (a BOS for Qwen, a pad for Llama 3) are -1, as SentencePiece
    reports them; :attr:`eod_id` (what ends every dataset document) is the EOS and raises
    :class:`TokenizerError` when there is none. BERT's :attr:`cls_id` / :attr:`sep_id` / :attr:`mask_id`
    are None when absent (most decoder tokenizers).
    """

    kind: str  # "sentencepiece" | "huggingface"

    @staticmethod
    def load(path: str | os.PathLike) -> Tokenizer:
        """The tokenizer in a directory (backend per :func:`tokenizer_kind`) or a ``.model`` /
        ``tokenizer.json`` file. FileNotFoundError (one line) naming the directory and the files looked
        for; :class:`TokenizerError` when Hugging Face files are inconsistent."""
        kind = tokenizer_kind(path)
        if kind == "huggingface":
            from tokenizer.hf_backend import HFTokenizer

            return HFTokenizer.from_path(path)
        p = Path(path)
        if kind is None and p.is_dir():
            raise FileNotFoundError(
                f"tokenizer not found: {path} has no {MODEL_FILE} (SentencePiece, python -m tokenizer.train) "
                f"and no {HF_TOKENIZER_FILE} (Hugging Face tokenizer files)"
            )
        if p.is_dir() and not (p / META_FILE).is_file() and (p / "tokenizer_config.json").is_file():
            # an HF slow tokenizer: its BOS/EOS and text rules live in transformers' tokenizer class, which
            # the bare SentencePiece model does not reproduce (ids would silently differ, e.g. no BOS)
            raise TokenizerError(
                f"{path}: a Hugging Face tokenizer ({MODEL_FILE} with tokenizer_config.json) without "
                f"{HF_TOKENIZER_FILE}; write it with transformers (AutoTokenizer.from_pretrained(DIR)"
                f".save_pretrained(DIR)) so bigtrain encodes exactly as transformers does"
            )
        return SentencePieceTokenizer.from_path(path)

    @abstractmethod
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of one text (no BOS/EOS unless requested)."""

    @abstractmethod
    def encode_batch(
        self, texts: list[str], add_bos: bool = False, add_eos: bool = False, num_threads: int = 0
    ) -> list[list[int]]:
        """:meth:`encode` of many texts, on native threads (``num_threads=0``: the backend's default)."""

    @abstractmethod
    def encode_documents(self, texts: list[bytes]) -> list[Any]:
        """UTF-8 documents as the int32 numpy id arrays a dataset stores (each ends with EOD)."""

    @abstractmethod
    def encode_as_hf(self, text: str) -> list[int]:
        """The ids the Hugging Face files (the export's tokenizer) give ``text``, BOS/EOS by their rules."""

    @abstractmethod
    def decode(self, ids: Sequence[int] | Any) -> str:
        """Text of a list (or numpy array) of ids."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Ids in use: the model's embedding needs at least this many rows."""

    @property
    @abstractmethod
    def unk_id(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @property
    @abstractmethod
    def eod_id(self) -> int: ...

    _bert_ids: dict[str, int | None]  # {"cls", "sep", "mask"}: set by each backend

    @property
    def cls_id(self) -> int | None:
        """BERT's ``[CLS]`` (sequence start; its final hidden state feeds NSP), None when absent."""
        return self._bert_ids["cls"]

    @property
    def sep_id(self) -> int | None:
        """BERT's ``[SEP]`` (ends each segment), None when absent."""
        return self._bert_ids["sep"]

    @property
    def mask_id(self) -> int | None:
        """BERT's ``[MASK]`` (replaces a predicted token), None when absent."""
        return self._bert_ids["mask"]

    @abstractmethod
    def id_to_piece(self, i: int) -> str:
        """The vocabulary string of id ``i`` (SentencePiece's piece, ``"▁the"``; WordPiece's ``"##ing"``);
        ``""`` for an id with no token."""

    def missing_bert_specials(self) -> list[str]:
        """Which of ``[CLS]``/``[SEP]``/``[MASK]``/pad the tokenizer lacks (empty: usable for bert data)."""
        ids = {"[CLS]": self.cls_id, "[SEP]": self.sep_id, "[MASK]": self.mask_id}
        missing = [name for name, i in ids.items() if i is None]
        return missing + (["pad"] if self.pad_id < 0 else [])

    @property
    @abstractmethod
    def model_path(self) -> Path:
        """The file the ids come from (``tokenizer.model`` or ``tokenizer.json``)."""

    @property
    def dir(self) -> Path:
        """Directory of the tokenizer: where its Hugging Face files live too."""
        return self.model_path.parent

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex of what decides the ids; datasets record it to catch a swapped tokenizer."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus the identity (fingerprint) that datasets record.

    Construct with :meth:`Tokenizer.load`. ``encode`` never adds BOS/EOS unless asked: datasets append
    only the EOD token, while the Hugging Face export adds BOS by default (like Llama), which equals
    ``encode(text, add_bos=True)``.
    """

    kind = "sentencepiece"

    def __init__(self, model_path: Path, model_bytes: bytes) -> None:
        import sentencepiece as spm

        self._model_path = model_path
        self._fingerprint = hashlib.sha256(model_bytes).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_bytes)
        self._bert_ids = self._special_ids(model_bytes)
        cls, sep, mask = self._bert_ids.values()
        self._bert = (cls, sep) if cls is not None and sep is not None and mask is not None else None

    @staticmethod
    def _special_ids(model_bytes: bytes) -> dict[str, int | None]:
        """Ids of BERT's specials, when the model has them as control or user-defined pieces (read from
        the proto: the Python API cannot tell a user-defined piece from a normal one)."""
        from tokenizer.hf import CONTROL, USER_DEFINED, load_model_proto

        proto = load_model_proto(model_bytes)
        found = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (CONTROL, USER_DEFINED)}
        return {name: found.get(piece) for name, piece in zip(("cls", "sep", "mask"), BERT_SPECIALS)}

    @classmethod
    def from_path(cls, dir_or_model_path: str | os.PathLike) -> SentencePieceTokenizer:
        """Load from a directory holding ``tokenizer.model`` or from the ``.model`` file itself."""
        model = resolve_model_path(dir_or_model_path)
        return cls(model.resolve(), model.read_bytes())

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of one text (no BOS/EOS unless requested)."""
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def encode_batch(
        self, texts: list[str], add_bos: bool = False, add_eos: bool = False, num_threads: int = 0
    ) -> list[list[int]]:
        """Token ids of many texts with SentencePiece's own C++ thread pool (the GIL is released).

        ``num_threads=0`` means one thread per CPU core.
        """
        return self._sp.encode(
            list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=self._threads(num_threads)
        )

    def _encode_arrays(
        self, texts: list[bytes], add_eos: bool, num_threads: int = 1, thread_pool: Any = None
    ) -> list[Any]:
        """Batch encode UTF-8 byte strings to int32 numpy arrays (used by tokenizer.preprocess).

        Skipping Python int lists saves the per-token object cost, which is most of the Python-side
        work when writing a dataset; the ids are identical to :meth:`encode_batch`.
        """
        return self._sp.encode(
            texts, add_eos=add_eos, num_threads=num_threads, thread_pool=thread_pool, out_type="numpy"
        )

    def encode_documents(self, texts: list[bytes]) -> list[Any]:
        """Dataset documents (tokenizer.preprocess): each text's ids then EOD, no BOS, as int32 arrays."""
        return self._encode_arrays(texts, add_eos=True, num_threads=1)

    def encode_as_hf(self, text: str) -> list[int]:
        """``AutoTokenizer(dir)(text, split_special_tokens=True)["input_ids"]``: BOS then the ids; with
        BERT's specials (``tokenizer.train --bert-specials``) ``[CLS]``, the ids, ``[SEP]``."""
        if self._bert is not None:
            return [self._bert[0], *self.encode(text), self._bert[1]]
        return self.encode(text, add_bos=True)

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Text of a list (or numpy array) of ids; ``decode(encode(x)) == x`` for models from train."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._sp.decode(list(ids))

    @staticmethod
    def _threads(num_threads: int) -> int:
        return num_threads if num_threads > 0 else (os.cpu_count() or 1)

    # -- identity -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eod_id(self) -> int:
        """End-of-document token appended to every document in a dataset; the same as EOS."""
        return self.eos_id

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def model_path(self) -> Path:
        return self._model_path

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the tokenizer.model bytes; datasets record it to catch a swapped tokenizer."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._model_path)!r}, vocab_size={self.vocab_size}, fingerprint={self._fingerprint[:12]})"


def bert_specials_hint(tok: Tokenizer, missing: Sequence[str]) -> str:
    """One line: the tokenizer directory lacks BERT's ``missing`` specials, and how to get them."""
    return (
        f"{tok.dir}: the tokenizer has no {'/'.join(missing)}, which bert data needs; train one with "
        "`python -m tokenizer.train ... --bert-specials` (adds [CLS] [SEP] [MASK]; pad is <pad>) or use a "
        "Hugging Face tokenizer naming cls_token/sep_token/mask_token/pad_token in tokenizer_config.json, "
        "then re-run tokenizer.preprocess --split-sentences"
    )


def export_files(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Copy a tokenizer directory's :data:`EXPORT_FILES` (those present) into ``out_dir``, byte for byte,
    so the export's tokenizer is the one the data was tokenized with; returns the copies.

    The directory must load (:meth:`Tokenizer.load`; its errors propagate), and for a Hugging Face
    backed one the copies are checked to fingerprint the same. Existing files of those names in
    ``out_dir`` are replaced; nothing else there is touched.
    """
    src, out = Path(tokenizer_dir), Path(out_dir)
    tok = Tokenizer.load(src)
    copied = []
    for name in EXPORT_FILES:
        if (src / name).is_file():
            copied.append(Path(shutil.copy2(src / name, out / name)))
    if tok.kind == "huggingface" and Tokenizer.load(out).fingerprint != tok.fingerprint:
        raise TokenizerError(f"{out}: the copied tokenizer files do not load as {src}'s")
    return copied
