"""Naming data on disk: prefixes, shard sets, directories, globs and weighted blends.

A *corpus* is one body of text (one weight in a blend). On disk it is one megatron-core indexed dataset
(``PREFIX.bin`` + ``PREFIX.idx``) or several shards of one (``PREFIX_00000.bin``, ...), named by the
prefix, a directory or a glob. Resolution happens here, once, so that every consumer (training blend,
validation, sequential evaluation) agrees on which files a name means and in which order.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DataSpec = Any  # str | list[str] | list[[weight, str]] (YAML-shaped, validated by parse_blend)

_GLOB_CHARS = re.compile(r"[*?\[]")
_SHARD_SUFFIX = re.compile(r"_\d+$")


class DataError(ValueError):
    """Unusable training data (a pretraining corpus or fine-tuning JSONL), phrased as one line naming the
    file (``file:line`` where there is one), raised before training starts. Also importable as
    ``bigtrain.data.DataError`` and ``bigtrain.finetune.data.DataError``."""


@dataclass(frozen=True)
class CorpusSpec:
    """One blend member as the user wrote it: a weight (None when not blended) and its names.

    Several names (a list of prefixes/globs) still make one corpus: their shards share its weight.
    """

    weight: float | None
    names: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.names[0] if len(self.names) == 1 else "[" + ", ".join(self.names) + "]"


def _natural_key(path: str) -> list[Any]:
    """``part_2`` before ``part_10``: shard order (and so evaluation order) follows the numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _stems(paths: Sequence[str]) -> list[str]:
    """Dataset prefixes behind a list of file paths (``x.bin``/``x.idx`` -> ``x``), in natural order."""
    stems = {p[: -len(ext)] for p in paths for ext in (".bin", ".idx") if p.endswith(ext)}
    return sorted(stems, key=_natural_key)


def shards_of(prefix: str) -> list[str]:
    """``PREFIX_00000``, ``PREFIX_00001``, ... in numeric order (empty when the prefix is not sharded)."""
    directory, base = os.path.split(prefix)
    pattern = re.compile(re.escape(base) + r"_(\d+)\.(bin|idx)$")
    found: dict[str, int] = {}
    for entry in os.listdir(directory or "."):
        m = pattern.match(entry)
        if m:
            found[os.path.join(directory, entry[: -len(".bin")])] = int(m.group(1))
    return sorted(found, key=lambda p: (found[p], p))


def resolve_corpus(name: str) -> list[str]:
    """The dataset prefixes one corpus name stands for, in a fixed order.

    Tried in turn: an exact prefix (``name.bin`` or ``name.idx`` exists), a directory (every dataset
    in it), a glob (``web/*``, ``web/part_*.bin``), the shards of a prefix (``name_00000``...).
    A prefix with only one of its two files is still returned: validation names the missing one.
    """
    name = os.path.expanduser(str(name))
    if os.path.exists(name + ".bin") or os.path.exists(name + ".idx"):
        return [os.path.abspath(name)]
    if os.path.isdir(name):
        prefixes = _stems(glob.glob(os.path.join(glob.escape(name), "*")))
    elif _GLOB_CHARS.search(name):
        prefixes = _stems(glob.glob(name) + glob.glob(name + ".bin") + glob.glob(name + ".idx"))
    else:
        prefixes = shards_of(name) if os.path.isdir(os.path.dirname(name) or ".") else []
    if not prefixes:
        raise DataError(
            f"{name}: no indexed dataset found (looked for {name}.bin/.idx, shards {name}_00000.bin/.idx, "
            "a directory or a glob)"
        )
    return [os.path.abspath(p) for p in prefixes]


def meta_path(prefix: str) -> str | None:
    """The JSON sidecar describing a dataset: ``PREFIX.meta.json``, or the shard set's ``BASE.meta.json``."""
    candidates = [prefix + ".meta.json"]
    if _SHARD_SUFFIX.search(prefix):
        candidates.append(_SHARD_SUFFIX.sub("", prefix) + ".meta.json")
    return next((c for c in candidates if os.path.isfile(c)), None)


def _weight(value: Any, name: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{field}: blend weight {value!r} for {name!r} is not a number")
    try:
        weight = float(value)
    except ValueError:
        raise DataError(f"{field}: blend weight {value!r} for {name!r} is not a number") from None
    if not weight > 0:  # also rejects NaN
        raise DataError(f"{field}: blend weight {value!r} for {name!r} must be > 0")
    return weight


def parse_blend(spec: DataSpec, field: str = "data.train") -> list[CorpusSpec]:
    """Normalize the accepted forms of ``data.train``/``data.valid`` into blend members.

    ``"prefix"`` (or a directory/glob) is one unweighted corpus; ``[[0.7, "web"], [0.3, "code"]]`` is a
    weighted blend (Megatron's flat ``[0.7, "web", 0.3, "code"]`` is accepted too); a list of plain names
    is one corpus made of all of them. Weights must be > 0: a zero weight is almost always a typo.
    """
    if isinstance(spec, str):
        if not spec.strip():
            raise DataError(f"{field}: empty dataset name")
        return [CorpusSpec(None, (spec,))]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise DataError(f"{field}: expected a prefix, a glob or [[weight, prefix], ...], got {spec!r}")
    if all(isinstance(item, str) for item in spec) and not _looks_flat_weighted(spec):
        if not all(name.strip() for name in spec):
            raise DataError(f"{field}: empty dataset name in {spec!r}")
        return [CorpusSpec(None, tuple(spec))]
    pairs: list[tuple[Any, Any]]
    if all(isinstance(item, (list, tuple)) for item in spec):
        if any(len(item) != 2 for item in spec):
            raise DataError(f"{field}: every blend member must be [weight, prefix], got {spec!r}")
        pairs = [(item[0], item[1]) for item in spec]
    elif len(spec) % 2 == 0 and all(isinstance(n, str) for n in spec[1::2]):
        pairs = list(zip(spec[0::2], spec[1::2]))
    else:
        raise DataError(f"{field}: expected [[weight, prefix], ...], got {spec!r}")
    members = []
    for weight, name in pairs:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{field}: blend member {name!r} is not a dataset name")
        members.append(CorpusSpec(_weight(weight, name, field), (name,)))
    return members


def _looks_flat_weighted(spec: Sequence[str]) -> bool:
    """``["0.7", "web", "0.3", "code"]``: Megatron's flat form with the weights as strings."""
    if len(spec) % 2:
        return False
    try:
        [float(w) for w in spec[0::2]]
    except ValueError:
        return False
    return True
