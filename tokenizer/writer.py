"""megatron-core indexed datasets written under temporary names, optionally sharded.

Output of ``PREFIX`` is ``PREFIX.bin``/``PREFIX.idx``, or with a shard size ``PREFIX_00000.bin``/
``.idx``, ``PREFIX_00001...`` (a new shard starts once the current one holds at least that many
tokens; documents are never split), plus one ``PREFIX.meta.json`` describing the whole set.

Crash safety: every file is written as ``<final name>.tmp-<pid>`` (a name no dataset reader
matches) and renamed only by :meth:`DatasetWriter.commit`, after all shards are finalized. The
commit removes the old ``PREFIX.meta.json`` first and writes the new one last, so the meta file is
the completion marker: an interrupted run leaves at most temporary files, and a set of
``.bin``/``.idx`` files without its meta file never comes from a finished run. Dataset files of an
earlier run under the same prefix (e.g. more shards, or an unsharded ``PREFIX.bin`` that readers
would take first) are removed at commit so they cannot blend into the new set, and so are the caches
bigtrain.data derived from them (:func:`remove_derived_caches`).

The ``IndexedDatasetBuilder`` itself lives in a child process (:class:`BuilderProcess`, see
:mod:`tokenizer.builder_proc` for why): importing megatron-core costs ~10 s, and this way the
first documents are read and tokenized while it loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from tokenizer.builder_proc import HEADER

# a document: its ids as one sequence, or its sentences' ids (one sequence each; the bert family's data)
Document: TypeAlias = np.ndarray | list[np.ndarray]
UINT16_VOCAB_LIMIT = 65500  # megatron's DType.optimal_dtype bound (readers accept any wide-enough dtype)


def choose_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 while every id fits with margin (vocab < 65500), int32 beyond: half the disk for most models."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


def meta_path(prefix: str) -> Path:
    return Path(prefix + ".meta.json")


# ---------------------------------------------------------------------------- derived caches
# bigtrain.data keeps what it derives from a dataset in a cache directory (``data.cache_dir``, by default
# ``cache/`` next to the data): the token-id range of each prefix, and megatron-core's index maps in one
# directory per set of input files. The layout is defined here, where datasets are replaced, so that a
# commit can drop the entries of the files it replaces; readers also key every entry by the files'
# identity, so an entry this cannot reach (another cache_dir) is never used for the new files either.
CACHE_DIR = "cache"
TOKEN_STATS_DIR = "token_stats"  # one JSON file per prefix (token_stats_file), "prefix" inside
INDEX_MAPS_DIR = "index"  # one directory per set of inputs, listed in its INDEX_INPUTS_FILE
INDEX_INPUTS_FILE = "inputs.json"  # {"prefixes": [...], "identities": [...]}


def default_cache_dir(prefix: str) -> str:
    """``cache/`` beside ``prefix``: where derived caches go when ``data.cache_dir`` is not set."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), CACHE_DIR)


def token_stats_file(prefix: str, cache_dir: str | None = None) -> str:
    """The token-id range cache of one (absolute) prefix."""
    digest = hashlib.md5(prefix.encode(), usedforsecurity=False).hexdigest()[:10]
    directory = cache_dir or default_cache_dir(prefix)
    return os.path.join(directory, TOKEN_STATS_DIR, f"{os.path.basename(prefix)}-{digest}.json")


def remove_derived_caches(prefixes: Iterable[str], cache_dir: str) -> list[str]:
    """Delete the entries of ``cache_dir`` derived from any of ``prefixes`` (absolute); returns their paths.

    Token-stats files of those prefixes, and every index-map directory whose inputs include one of them
    (a blend's maps depend on all its members). Entries of other datasets are kept.
    """
    wanted = set(prefixes)
    removed = [p for p in (token_stats_file(x, cache_dir) for x in sorted(wanted)) if os.path.isfile(p)]
    for path in removed:
        os.unlink(path)
    index_root = os.path.join(cache_dir, INDEX_MAPS_DIR)
    for name in sorted(os.listdir(index_root)) if os.path.isdir(index_root) else []:
        entry = os.path.join(index_root, name)
        try:
            with open(os.path.join(entry, INDEX_INPUTS_FILE)) as f:
                inputs = json.load(f).get("prefixes", [])
        except (OSError, ValueError, AttributeError):
            continue  # not an entry of ours (or one still being written): leave it
        if wanted & set(inputs):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class BuilderProcess:
    """Parent side of :mod:`tokenizer.builder_proc`: starts it, feeds it, notes when it is ready.

    Records go through a queue drained by a sender thread: while the child is still importing
    megatron the pipe is full and the sender blocks (GIL released) while encoding goes on. The
    queue holds at most ``max_queued_bytes`` (default 128 MiB, ~200 MB of text as uint16
    tokens: more than the import lasts at full speed), then :meth:`add_documents` waits, so
    memory stays bounded whatever the input size.
    """

    def __init__(self, max_queued_bytes: int = 128 << 20) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tokenizer.builder_proc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None  # both piped above
        self._stdin, self._stdout = self._proc.stdin, self._proc.stdout
        self.ready_at: float | None = None
        self.import_cpu_s: float | None = None  # child CPU time spent importing megatron
        self.total_cpu_s: float | None = None  # child CPU time in all
        self._ready = threading.Event()
        self._records: deque[tuple[list[Any], int] | None] = deque()
        self._queued_bytes = 0
        self._max_bytes = max_queued_bytes
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        threading.Thread(target=self._watch_ready, name="builder-ready", daemon=True).start()
        self._sender = threading.Thread(target=self._send_loop, name="builder-send", daemon=True)
        self._sender.start()

    def _watch_ready(self) -> None:
        word, _, cpu = self._stdout.readline().partition(b" ")
        if word == b"ready":
            self.ready_at = time.monotonic()
            self.import_cpu_s = float(cpu)
        self._ready.set()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._records:
                    self._cond.wait()
                record = self._records.popleft()
            if record is None:
                return
            parts, size = record
            if self._error is None:  # after an error keep draining, so senders never block forever
                try:
                    for part in parts:
                        self._stdin.write(part)
                except OSError as e:
                    self._error = e
            with self._cond:
                self._queued_bytes -= size
                self._cond.notify_all()

    def _enqueue(self, record: tuple[list[Any], int] | None) -> None:
        with self._cond:
            if record is not None:
                while self._queued_bytes and self._queued_bytes + record[1] > self._max_bytes:
                    self._cond.wait()
                self._queued_bytes += record[1]
            self._records.append(record)
            self._cond.notify_all()

    def _send(self, parts: list[Any]) -> None:
        self._enqueue((parts, sum(memoryview(p).nbytes for p in parts)))
        if self._error is not None:
            raise RuntimeError(f"dataset builder process failed ({self._error}); see its error above")

    def open(self, bin_path: str, dtype: type[np.integer]) -> None:
        path, name = bin_path.encode(), np.dtype(dtype).name.encode()
        self._send([HEADER.pack(b"O", len(path), len(name)), path, name])

    def add_documents(self, docs: Sequence[Document], dtype: type[np.integer]) -> None:
        """Append documents: each an id array (one sequence) or a list of them (its sentences)."""
        if any(isinstance(d, list) for d in docs):
            sentences = [list(d) if isinstance(d, list) else [d] for d in docs]
            counts = np.array([len(d) for d in sentences], dtype=np.int64)
            flat = [s for d in sentences for s in d]
            lengths = np.fromiter((s.size for s in flat), dtype=np.int64, count=len(flat))
            tokens = np.concatenate(flat or [np.zeros(0, dtype)]).astype(dtype, copy=False)
            self._send([HEADER.pack(b"S", len(docs), tokens.size), counts.data, lengths.data, tokens.data])
            return
        lengths = np.fromiter(map(document_size, docs), dtype=np.int64, count=len(docs))
        tokens = np.concatenate(docs).astype(dtype, copy=False)
        self._send([HEADER.pack(b"D", len(docs), tokens.size), lengths.data, tokens.data])

    def finalize(self, idx_path: str) -> None:
        path = idx_path.encode()
        self._send([HEADER.pack(b"F", len(path), 0), path])

    def close(self) -> None:
        """Send the end record and wait until every file is finalized; raises if the child failed."""
        self._send([HEADER.pack(b"Q", 0, 0)])
        self._enqueue(None)
        self._sender.join()
        if self._error is None:
            try:
                self._stdin.close()
            except OSError as e:
                self._error = e
        self._ready.wait()
        tail = self._stdout.read()
        self._stdout.close()  # else a ResourceWarning (unclosed file) when the Popen is collected
        status = self._proc.wait()
        word, _, cpu = tail.partition(b" ")
        if self._error is not None or status != 0 or word != b"done":
            raise RuntimeError(f"dataset builder process failed (exit status {status}); see its error above")
        self.total_cpu_s = float(cpu)

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._enqueue(None)
        self._sender.join()  # its writes fail (broken pipe) and it drains the queue
        self._ready.wait()  # the reader sees end of file once the child is gone
        for pipe in (self._stdin, self._stdout):  # the Popen's pipes, narrowed in __init__
            try:
                pipe.close()
            except OSError:  # stdin's buffered bytes cannot reach the dead child
                pass


def document_size(doc: Document) -> int:
    """Tokens in a document (all its sentences)."""
    return sum(s.size for s in doc) if isinstance(doc, list) else doc.size


@dataclass
class ShardInfo:
    prefix: str
    documents: int = 0
    tokens: int = 0


class DatasetWriter:
    """Appends documents (token arrays already ending with EOD, or lists of sentence arrays) to one or more
    indexed datasets."""

    def __init__(
        self, prefix: str, dtype: type[np.integer], builder: BuilderProcess, shard_size_tokens: int = 0
    ) -> None:
        self.prefix = prefix
        self.dtype = dtype
        self.shard_size_tokens = shard_size_tokens
        self.builder = builder
        self._tag = f".tmp-{os.getpid()}"
        self._open = False
        self._temps: list[Path] = []
        self.shards: list[ShardInfo] = []
        self.removed_caches: list[str] = []  # derived-cache entries the commit deleted

    # -- writing ---------------------------------------------------------------------------------

    def add(self, docs: Sequence[Document]) -> None:
        """Append documents in order, starting a new shard whenever the current one is full."""
        start = 0
        while start < len(docs):
            if not self._open or self._full():
                self._open_shard()
            shard, end = self.shards[-1], start
            while end < len(docs) and not self._full():
                shard.documents += 1
                shard.tokens += document_size(docs[end])
                end += 1
            self.builder.add_documents(docs[start:end], self.dtype)
            start = end

    def _full(self) -> bool:
        return bool(self.shard_size_tokens) and self.shards[-1].tokens >= self.shard_size_tokens

    def _open_shard(self) -> None:
        self._finalize_shard()
        index = len(self.shards)
        if index and not self.shard_size_tokens:
            raise AssertionError("unsharded output opened twice")
        prefix = f"{self.prefix}_{index:05d}" if self.shard_size_tokens else self.prefix
        bin_tmp, idx_tmp = prefix + ".bin" + self._tag, prefix + ".idx" + self._tag
        self._temps += [Path(bin_tmp), Path(idx_tmp)]
        self.builder.open(bin_tmp, self.dtype)
        self.shards.append(ShardInfo(prefix))
        self._open = True

    def _finalize_shard(self) -> None:
        if self._open:
            self.builder.finalize(self.shards[-1].prefix + ".idx" + self._tag)
            self._open = False

    def close(self) -> list[ShardInfo]:
        """Finalize the last shard and wait for the builder process (files keep temporary names)."""
        self._finalize_shard()
        self.builder.close()
        return self.shards

    # -- commit / abort --------------------------------------------------------------------------

    def commit(self, meta: dict[str, Any]) -> list[str]:
        """Give the finished files their final names and write the meta file last; returns the prefixes."""
        final_meta = meta_path(self.prefix)
        final_meta.unlink(missing_ok=True)
        old_outputs = self._existing_outputs()
        for old in old_outputs:
            old.unlink()
        replaced = {os.path.abspath(os.path.splitext(p)[0]) for p in old_outputs}
        replaced |= {os.path.abspath(s.prefix) for s in self.shards}
        self.removed_caches = remove_derived_caches(replaced, default_cache_dir(self.prefix))
        for ext in (".bin", ".idx"):
            for shard in self.shards:
                os.replace(shard.prefix + ext + self._tag, shard.prefix + ext)
        tmp_meta = Path(str(final_meta) + self._tag)
        tmp_meta.write_text(
            json.dumps({**meta, "shards": [self._shard_entry(s) for s in self.shards]}, indent=2) + "\n"
        )
        os.replace(tmp_meta, final_meta)
        self._temps.clear()
        return [s.prefix for s in self.shards]

    @staticmethod
    def _shard_entry(shard: ShardInfo) -> dict[str, Any]:
        """Shard as listed in the meta file: name relative to it, so a copied directory stays valid."""
        return {**asdict(shard), "prefix": os.path.basename(shard.prefix)}

    def _existing_outputs(self) -> list[Path]:
        """Dataset files already on disk under this prefix: ``PREFIX.bin/.idx``, ``PREFIX_NNNNN.bin/.idx``."""
        directory, base = os.path.split(self.prefix)
        pattern = re.compile(re.escape(base) + r"(_\d{5,})?\.(bin|idx)$")
        folder = Path(directory or ".")
        return [folder / name for name in os.listdir(folder) if pattern.match(name)]

    def abort(self) -> None:
        """Stop the builder process and delete every temporary file; final names are never touched."""
        self.builder.kill()
        for path in self._temps:
            path.unlink(missing_ok=True)
        self._temps.clear()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or self._temps:
            self.abort()
