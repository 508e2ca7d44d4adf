"""bigtrain tokenizer: one SentencePiece model shared by data preprocessing, training and HF export.

Every part of bigtrain talks to the tokenizer through :class:`Tokenizer` so that ids, special tokens
and the end-of-document convention cannot drift apart between the dataset and the model.

Id convention of models trained by ``python -m tokenizer.train``: unk=0, bos=1, eos=2, pad=3, and
``eod_id == eos_id`` (the token appended after every document in a preprocessed dataset).

Importing this package is deliberately cheap: ``sentencepiece`` is imported on first
:meth:`Tokenizer.load`, and torch / transformers / megatron are never imported here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL_FILE = "tokenizer.model"
META_FILE = "bigtrain_tokenizer.json"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

__all__ = [
    "Tokenizer",
    "MODEL_FILE",
    "META_FILE",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "resolve_model_path",
]


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


class Tokenizer:
    """A SentencePiece model plus the identity (fingerprint) that datasets record.

    Construct with :meth:`load`. ``encode`` never adds BOS/EOS unless asked: datasets append only
    the EOD token, while the Hugging Face export adds BOS by default (like Llama), which equals
    ``encode(text, add_bos=True)``.
    """

    def __init__(self, model_path: Path, model_bytes: bytes) -> None:
        import sentencepiece as spm

        self._model_path = model_path
        self._fingerprint = hashlib.sha256(model_bytes).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_bytes)

    @classmethod
    def load(cls, dir_or_model_path: str | os.PathLike) -> Tokenizer:
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

    @property
    def model_path(self) -> Path:
        return self._model_path

    @property
    def dir(self) -> Path:
        """Directory of the model: where the Hugging Face files written by train live too."""
        return self._model_path.parent

    @property
    def fingerprint(self) -> str:
        """sha256 hex of the tokenizer.model bytes; datasets record it to catch a swapped tokenizer."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._model_path)!r}, vocab_size={self.vocab_size}, fingerprint={self._fingerprint[:12]})"
