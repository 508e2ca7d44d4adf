"""Checks on tokenized data, run once before training starts.

A bad dataset otherwise shows up hours into a job as an embedding index error on one rank, a hang at
a barrier, or silently wrong training (data from another tokenizer). Everything here is cheap except
the token-id range scan, whose result is cached next to the index maps, keyed by the identity of the
files (:func:`data_identity`: sizes, mtimes and the preprocessing run), so a restart does not read the
corpus again and a re-preprocessed prefix is never judged by its predecessor's figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bigtrain.data.corpus import CorpusSpec, DataError, DataSpec, meta_path, parse_blend, resolve_corpus
from tokenizer.writer import token_stats_file

logger = logging.getLogger(__name__)

INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
_DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_SCAN_CHUNK = 1 << 24  # tokens per read while scanning for the id range
_STATS_VERSION = 2  # 2: the key holds the metadata digest (data_identity)


def token_dtype_problem(dtype: np.dtype, vocab_size: int | None) -> str | None:
    """Why token ids cannot be stored as ``dtype`` (None when they can).

    The one rule for training, evaluation and validation: any integer dtype, signed or unsigned, whose
    range holds every id ``0 .. vocab_size - 1``. ``tokenizer.preprocess`` writes uint16 or int32, but
    megatron-core's ``IndexedDatasetBuilder`` defaults to int32 and older tools wrote int64: all read alike.
    """
    if dtype.kind not in "iu":
        return f"token dtype {dtype.name} is not an integer type"
    if vocab_size is not None and np.iinfo(dtype).max < vocab_size - 1:
        return (
            f"token dtype {dtype.name} cannot hold ids up to {vocab_size - 1} (vocab size {vocab_size}; "
            f"its largest value is {np.iinfo(dtype).max}); tokenized for another vocabulary?"
        )
    return None


@dataclass
class ShardInfo:
    """One indexed dataset (``prefix.bin``/``.idx``) as found on disk."""

    prefix: str
    dtype: np.dtype
    num_docs: int
    num_sequences: int
    num_tokens: int
    meta_file: str | None = None
    meta: dict[str, Any] | None = None
    min_id: int | None = None
    max_id: int | None = None
    identity: dict[str, Any] = field(default_factory=dict)  # see data_identity


@dataclass
class Corpus:
    """A blend member resolved to its shards (``weight`` None when the data is not a weighted blend)."""

    spec: CorpusSpec
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def weight(self) -> float | None:
        return self.spec.weight

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)


# ---------------------------------------------------------------------------------------------- files
def read_index(prefix: str) -> tuple[np.dtype, int, np.ndarray]:
    """(token dtype, document count, per-sequence lengths) from ``prefix.idx``, checked for corruption.

    megatron-core would fail on a bad index with a bare assert or a numpy buffer error; reading the
    header here turns that into a message naming the file.
    """
    idx = prefix + ".idx"
    size = os.path.getsize(idx)
    if size < _HEADER.size:
        raise DataError(f"{idx}: corrupt index (truncated: {size} bytes, the header alone is {_HEADER.size})")
    with open(idx, "rb") as f:
        magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
    if magic != INDEX_MAGIC:
        raise DataError(f"{idx}: corrupt index (wrong magic {magic!r}, expected {INDEX_MAGIC!r})")
    if version != 1:
        raise DataError(f"{idx}: unsupported index version {version} (expected 1)")
    if code not in _DTYPE_CODES:
        raise DataError(f"{idx}: corrupt index (unknown dtype code {code})")
    expected = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if size < expected:
        raise DataError(f"{idx}: corrupt index (truncated: {size} bytes, header announces {expected})")
    # Memory-mapped, not read: a billion-document index stays out of RAM while it is summed.
    lengths = (
        np.memmap(idx, dtype=np.int32, mode="r", offset=_HEADER.size, shape=(n_seq,))
        if n_seq
        else np.zeros(0, dtype=np.int32)
    )
    if n_doc < 1:
        raise DataError(f"{idx}: corrupt index (no document boundaries)")
    last_doc_end = np.fromfile(
        idx, dtype=np.int64, count=1, offset=_HEADER.size + 12 * n_seq + 8 * (n_doc - 1)
    )
    if int(last_doc_end[0]) != n_seq or (n_seq and int(lengths.min()) < 0):
        raise DataError(f"{idx}: corrupt index (document boundaries do not match {n_seq} sequences)")
    return np.dtype(_DTYPE_CODES[code]), n_doc - 1, lengths


def _read_meta(prefix: str) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(path, parsed object, sha256 of its bytes) of the dataset's metadata; Nones when it has none."""
    path = meta_path(prefix)
    if path is None:
        return None, None, None
    try:
        with open(path, "rb") as f:
            raw = f.read()
        meta = json.loads(raw)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable dataset metadata ({e})".replace("\n", " ")) from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: dataset metadata is not a JSON object")
    return path, meta, hashlib.sha256(raw).hexdigest()


def data_identity(prefix: str, meta_sha256: str | None = None) -> dict[str, Any]:
    """What a cache derived from ``prefix.bin``/``.idx`` must be keyed by: both files' sizes and mtimes
    (ns) and the sha256 of the metadata ``tokenizer.preprocess`` wrote (unique per run: it holds a
    ``preprocess_id``), so re-preprocessing to the same prefix never meets the old run's caches, even when
    sizes and mtimes agree (a copy with ``cp -p``, a coarse-mtime file system)."""
    b, i = os.stat(prefix + ".bin"), os.stat(prefix + ".idx")
    return {
        "bin_size": b.st_size,
        "bin_mtime_ns": b.st_mtime_ns,
        "idx_size": i.st_size,
        "idx_mtime_ns": i.st_mtime_ns,
        "meta_sha256": meta_sha256,
    }


def content_identity(prefix: str) -> dict[str, Any]:
    """What a checkpoint records of one dataset it was trained on: what changes with the content and not
    with a copy to another machine (mtimes do): both files' sizes and the sha256 of ``PREFIX.meta.json``
    (None without one), whose ``preprocess_id`` is unique per ``tokenizer.preprocess`` run."""
    b, i = os.stat(prefix + ".bin"), os.stat(prefix + ".idx")
    return {"bin_size": b.st_size, "idx_size": i.st_size, "meta_sha256": _read_meta(prefix)[2]}


def data_record(data: DataSpec, field: str) -> list[dict[str, Any]]:
    """``data.train``/``data.valid`` as the files it names now: per blend member its weight and its shards
    as ``[absolute prefix, content_identity]`` in blend order. Raises DataError or OSError when a file is
    missing or unreadable."""
    members = []
    for spec in parse_blend(data, field):
        prefixes = dict.fromkeys(p for name in spec.names for p in resolve_corpus(name))
        members.append({"weight": spec.weight, "shards": [[p, content_identity(p)] for p in prefixes]})
    return members


def recorded_data(data: Any) -> dict[str, Any]:
    """What a checkpoint's ``bigtrain.json`` records of the data it was trained on (``data``: the config's
    ``data`` section): ``{"data.train": data_record, "data.valid": ...}`` for the fields that are set, a
    record None where the files cannot be read; empty for mock data."""
    if data.mock:
        return {}
    out: dict[str, Any] = {}
    for name in ("train", "valid"):
        spec = getattr(data, name)
        if spec is not None:
            try:
                out[f"data.{name}"] = data_record(spec, f"data.{name}")
            except (DataError, OSError):
                out[f"data.{name}"] = None
    return out


def _as_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:
        return None


def fingerprint_of(meta: dict[str, Any]) -> str | None:
    value = meta.get("tokenizer_fingerprint")  # key written by tokenizer.preprocess
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------------- id-range scan
def _file_key(prefix: str, dtype: np.dtype, identity: dict[str, Any] | None = None) -> dict[str, Any]:
    if identity is None:
        identity = data_identity(prefix, _read_meta(prefix)[2])
    return {"version": _STATS_VERSION, **identity, "dtype": dtype.name}


def scan_token_range(prefix: str, dtype: np.dtype, num_tokens: int) -> tuple[int, int]:
    """(min id, max id) over ``prefix.bin``, read in fixed-size chunks through a memory map;
    ValueError when ``num_tokens`` is 0 (an empty file has no range)."""
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(num_tokens,))
    lows, highs = [], []
    for start in range(0, num_tokens, _SCAN_CHUNK):
        chunk = data[start : start + _SCAN_CHUNK]
        lows.append(int(chunk.min()))
        highs.append(int(chunk.max()))
    del data
    return min(lows), max(highs)


def token_range(
    prefix: str,
    dtype: np.dtype,
    num_tokens: int,
    cache_dir: str | None = None,
    identity: dict[str, Any] | None = None,
) -> tuple[int, int]:
    """The id range of a dataset, from the stats cache when the files are unchanged (same
    :func:`data_identity`, computed when not given), else scanned and cached."""
    path = token_stats_file(prefix, cache_dir)
    key = _file_key(prefix, dtype, identity)
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return int(cached["min_id"]), int(cached["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    lo, hi = scan_token_range(prefix, dtype, num_tokens)
    try:  # a read-only data directory only costs the rescan next time
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"prefix": prefix, "key": key, "min_id": lo, "max_id": hi}, f)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not cache token stats for %s: %s", prefix, e)
    return lo, hi


# ----------------------------------------------------------------------------------------- checks
def inspect_shard(
    prefix: str,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    cache_dir: str | None = None,
) -> ShardInfo:
    """Every per-file check on one dataset; returns what training needs to know about it."""
    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise DataError(
                f"{prefix + ext}: missing (an indexed dataset needs both {prefix}.bin and {prefix}.idx)"
            )
    dtype, num_docs, lengths = read_index(prefix)
    num_tokens = int(lengths.sum(dtype=np.int64))
    bin_size = os.path.getsize(prefix + ".bin")
    if bin_size != num_tokens * dtype.itemsize:
        raise DataError(
            f"{prefix}.bin: {bin_size} bytes but {prefix}.idx describes {num_tokens} {dtype.name} tokens "
            f"({num_tokens * dtype.itemsize} bytes); the pair is truncated or mismatched"
        )
    meta_file, meta, meta_sha256 = _read_meta(prefix)
    identity = data_identity(prefix, meta_sha256)
    info = ShardInfo(prefix, dtype, num_docs, len(lengths), num_tokens, meta_file, meta, identity=identity)
    if meta is not None:
        recorded = fingerprint_of(meta)
        current = getattr(tokenizer, "fingerprint", None) if tokenizer is not None else None
        if recorded and current and recorded != current:
            raise DataError(
                f"{meta_file}: data was tokenized with a different tokenizer (fingerprint {recorded[:12]}, "
                f"data.tokenizer has {current[:12]}); re-run tokenizer.preprocess or fix data.tokenizer"
            )
        meta_dtype = meta.get("dtype")
        if isinstance(meta_dtype, str) and _as_dtype(meta_dtype) != dtype:
            raise DataError(f"{meta_file}: records dtype {meta_dtype} but {prefix}.idx stores {dtype.name}")
    problem = token_dtype_problem(dtype, vocab_size)
    if problem:
        raise DataError(f"{prefix}.idx: {problem}")
    if vocab_size is not None and num_tokens:
        info.min_id, info.max_id = token_range(prefix, dtype, num_tokens, cache_dir, identity)
        if info.max_id >= vocab_size or info.min_id < 0:
            bad = info.max_id if info.max_id >= vocab_size else info.min_id
            raise DataError(
                f"{prefix}.bin: token id {bad} is outside the vocabulary [0, {vocab_size}); "
                "the data was tokenized with another tokenizer"
            )
    return info


def check_shard_set(name: str, shards: Sequence[ShardInfo]) -> None:
    """A shard set named by its prefix must be complete and match the counts its ``PREFIX.meta.json``
    lists: a shard lost in a copy, or left over from another preprocessing run, fails here by name."""
    path = os.path.abspath(os.path.expanduser(name)) + ".meta.json"
    if not os.path.isfile(path):
        return
    with open(path) as f:
        try:
            listed = json.load(f).get("shards")
        except (ValueError, AttributeError):
            return  # unreadable metadata is reported by inspect_shard
    if not isinstance(listed, list):
        return
    found = {os.path.basename(s.prefix): s for s in shards}
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("prefix"), str):
            continue
        base = os.path.basename(entry["prefix"])
        shard_prefix = os.path.join(os.path.dirname(path), base)
        if base not in found:
            raise DataError(f"{shard_prefix}.bin: missing (listed as a shard in {path})")
        tokens = entry.get("tokens")
        if isinstance(tokens, int) and tokens != found[base].num_tokens:
            raise DataError(
                f"{shard_prefix}.bin: holds {found[base].num_tokens} tokens but {path} records {tokens} "
                "(files from different preprocessing runs?)"
            )


def check_same_tokenizer(corpora: Iterable[Corpus]) -> None:
    """Every shard whose metadata records a tokenizer fingerprint records the same one: a blend (or a
    train/valid pair) mixing data of two tokenizers trains on ids that mean different things, which no
    vocabulary bound catches when ``data.tokenizer`` is unset. Raises :class:`DataError` naming both."""
    first: tuple[str, str] | None = None
    for corpus in corpora:
        for shard in corpus.shards:
            fingerprint = fingerprint_of(shard.meta) if shard.meta else None
            if fingerprint is None:
                continue
            if first is None:
                first = (fingerprint, shard.meta_file or shard.prefix)
            elif fingerprint != first[0]:
                raise DataError(
                    f"{shard.meta_file or shard.prefix}: tokenized with another tokenizer (fingerprint "
                    f"{fingerprint[:12]}) than {first[1]} ({first[0][:12]}); re-preprocess one of them with "
                    "the other's tokenizer, and set data.tokenizer to have it checked"
                )


def validate_data(
    data: DataSpec | Iterable[str],
    vocab_size: int | None = None,
    tokenizer: Any = None,
    *,
    cache_dir: str | None = None,
    field: str = "data",
) -> list[Corpus]:
    """Resolve and check every dataset named by ``data``; raise :class:`DataError` on the first problem.

    ``data`` takes the ``data.train`` forms (prefix, directory, glob, list, ``[[weight, prefix], ...]``).
    ``vocab_size`` defaults to the tokenizer's; without either, only the structural checks run.
    Returns the corpora in blend order with their shards, so callers need not read headers again.
    """
    if vocab_size is None and tokenizer is not None:
        vocab_size = int(tokenizer.vocab_size)
    corpora = []
    if not isinstance(data, (str, list, tuple)):
        data = list(data)
    for spec in parse_blend(data, field):
        prefixes = [p for name in spec.names for p in resolve_corpus(name)]
        shards = [inspect_shard(p, vocab_size, tokenizer, cache_dir) for p in dict.fromkeys(prefixes)]
        for name in spec.names:
            check_shard_set(name, shards)
        corpus = Corpus(spec, shards)
        if corpus.num_tokens == 0:
            files = ", ".join(s.prefix + ".bin" for s in shards)
            raise DataError(f"{field}: corpus {spec.label} is empty (0 tokens in {files})")
        corpora.append(corpus)
    check_same_tokenizer(corpora)
    return corpora
