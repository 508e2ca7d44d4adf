"""A child process that owns megatron-core's ``IndexedDatasetBuilder`` for tokenizer.preprocess.

Why a process and not a thread: importing ``megatron.core`` takes ~10 s of CPU (it pulls in torch
and most of megatron), and much of that runs in C with the GIL held for up to half a second at a
time. Done in a background thread it starved the reading/encoding threads and was itself slowed
2-3x; in a separate process the two only share CPU cores, so tokenizing starts at once and runs
at full speed while the builder loads.

Protocol on stdin, little-endian, one record after another:

* ``O`` n m, then n bytes of path and m bytes of dtype name: open a builder on that .bin path;
* ``D`` n k, then n int64 document lengths and k tokens of the dtype: append n documents;
* ``S`` n k, then n int64 sentence counts, their sum m int64 sentence lengths and k tokens: append n
  documents of several sequences each (``preprocess --split-sentences``);
* ``F`` n 0, then n bytes of path: finalize the current builder, writing the .idx there;
* ``Q`` 0 0: exit with status 0 after printing ``done``.

On stdout the child prints ``ready <cpu seconds>`` once the builder class is imported and
``done <cpu seconds>`` at ``Q`` (its CPU time so far, so the import cost can be reported apart).
End of input without ``Q`` (the parent died or aborted) exits with status 1 without finalizing.
"""

from __future__ import annotations

import os
import struct
import sys
import warnings
from typing import BinaryIO

HEADER = struct.Struct("<cQQ")


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def serve(inp: BinaryIO, out: BinaryIO) -> int:
    """Run the protocol above until ``Q`` (0) or end of input (1)."""
    warnings.filterwarnings("ignore", category=UserWarning)  # "Transformer Engine / Apex not installed"
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out.write(b"ready %.3f\n" % cpu_seconds())
    out.flush()
    builder = None
    dtype = np.dtype(np.int32)
    try:
        while True:
            kind, a, b = HEADER.unpack(_read_exact(inp, HEADER.size))
            if kind == b"O":
                path = _read_exact(inp, a).decode()
                dtype = np.dtype(_read_exact(inp, b).decode())
                builder = IndexedDatasetBuilder(path, dtype=dtype.type)
            elif kind == b"D":
                if builder is None:
                    raise ValueError("D record before any O record")
                lengths = np.frombuffer(_read_exact(inp, 8 * a), dtype=np.int64)
                tokens = np.frombuffer(_read_exact(inp, b * dtype.itemsize), dtype=dtype)
                start = 0
                for n in lengths.tolist():
                    builder.add_document(tokens[start : start + n], [n])
                    start += n
            elif kind == b"S":
                if builder is None:
                    raise ValueError("S record before any O record")
                counts = np.frombuffer(_read_exact(inp, 8 * a), dtype=np.int64)
                lengths = np.frombuffer(_read_exact(inp, 8 * int(counts.sum())), dtype=np.int64)
                tokens = np.frombuffer(_read_exact(inp, b * dtype.itemsize), dtype=dtype)
                start = sentence = 0
                for count in counts.tolist():
                    doc = lengths[sentence : sentence + count]
                    builder.add_document(tokens[start : start + int(doc.sum())], doc.tolist())
                    start += int(doc.sum())
                    sentence += count
            elif kind == b"F":
                if builder is None:
                    raise ValueError("F record before any O record")
                builder.finalize(_read_exact(inp, a).decode())
                builder = None
            elif kind == b"Q":
                out.write(b"done %.3f\n" % cpu_seconds())
                out.flush()
                return 0
            else:
                raise ValueError(f"unknown record {kind!r}")
    except EOFError:
        return 1


if __name__ == "__main__":
    status = serve(sys.stdin.buffer, sys.stdout.buffer)
    # Every file is closed by now; skip interpreter teardown, which with torch loaded takes ~1 s
    # that the parent would spend waiting.
    os._exit(status)
