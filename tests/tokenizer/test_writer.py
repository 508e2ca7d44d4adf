"""DatasetWriter naming rules without megatron: temporary names until commit, meta last, clean abort."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tokenizer.writer import (
    CACHE_DIR,
    INDEX_INPUTS_FILE,
    INDEX_MAPS_DIR,
    TOKEN_STATS_DIR,
    DatasetWriter,
    token_stats_file,
)


class FakeBuilder:
    """Stands in for BuilderProcess: writes the files the child would write, synchronously."""

    def __init__(self) -> None:
        self.file = None
        self.killed = False

    def open(self, bin_path: str, dtype: type) -> None:
        self.file = open(bin_path, "wb")

    def add_documents(self, docs: list[np.ndarray], dtype: type) -> None:
        self.file.write(np.concatenate(docs).astype(dtype).tobytes())

    def finalize(self, idx_path: str) -> None:
        self.file.close()
        Path(idx_path).write_bytes(b"idx")

    def close(self) -> None:
        pass

    def kill(self) -> None:
        self.killed = True
        if self.file is not None:
            self.file.close()


def docs(*lengths: int) -> list[np.ndarray]:
    return [np.full(n, 7, dtype=np.int32) for n in lengths]


def test_files_keep_temporary_names_until_commit(tmp_path: Path) -> None:
    writer = DatasetWriter(str(tmp_path / "d"), np.uint16, FakeBuilder(), shard_size_tokens=10)
    writer.add(docs(6, 6, 3))  # shard 0 reaches 12 >= 10, then shard 1 gets the 3
    writer.add(docs(20, 1))  # shard 1: 3 + 20; shard 2: 1
    shards = writer.close()
    assert [(s.documents, s.tokens) for s in shards] == [(2, 12), (2, 23), (1, 1)]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert all(".tmp-" in n for n in names) and len(names) == 6
    writer.commit({"documents": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"d_{i:05d}.{ext}" for i in range(3) for ext in ("bin", "idx")] + ["d.meta.json"]
    )
    meta = json.loads((tmp_path / "d.meta.json").read_text())
    assert meta["documents"] == 5 and [s["tokens"] for s in meta["shards"]] == [12, 23, 1]
    assert (tmp_path / "d_00001.bin").stat().st_size == 23 * 2


def test_abort_removes_temporaries_and_keeps_existing_outputs(tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(b"old")
    (tmp_path / "d.idx").write_bytes(b"old")
    builder = FakeBuilder()
    with DatasetWriter(str(tmp_path / "d"), np.uint16, builder) as writer:  # leaving uncommitted aborts
        writer.add(docs(4, 5))
        assert len(list(tmp_path.glob("*.tmp-*"))) == 1  # the .bin being written
    assert builder.killed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    assert (tmp_path / "d.bin").read_bytes() == b"old"


def test_commit_replaces_a_previous_run_under_the_same_prefix(tmp_path: Path) -> None:
    for name in ("d.bin", "d.idx", "d_00000.bin", "d_00000.idx", "d_00007.bin", "d_00007.idx", "d.meta.json"):
        (tmp_path / name).write_bytes(b"stale")
    (tmp_path / "other.bin").write_bytes(b"keep")
    writer = DatasetWriter(str(tmp_path / "d"), np.uint16, FakeBuilder())
    writer.add(docs(3))
    writer.close()
    writer.commit({})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx", "d.meta.json", "other.bin"]
    assert (tmp_path / "d.bin").stat().st_size == 6


def test_commit_removes_the_caches_derived_from_the_files_it_replaces(tmp_path: Path) -> None:
    """bigtrain.data's token stats and index-map entries of a replaced prefix (old shards included) go;
    those of other datasets, a blend's entry that includes the prefix excepted, stay."""
    prefix, old_shard, other = (str(tmp_path / n) for n in ("d", "d_00003", "other"))
    for name in ("d_00003.bin", "d_00003.idx", "other.bin", "other.idx"):
        (tmp_path / name).write_bytes(b"old")
    cache = tmp_path / CACHE_DIR
    for p in (prefix, old_shard, other):
        Path(token_stats_file(p)).parent.mkdir(parents=True, exist_ok=True)
        Path(token_stats_file(p)).write_text(json.dumps({"prefix": p}))
    entries = {"mine": [prefix], "old_shard": [old_shard], "blend": [other, prefix], "theirs": [other]}
    for name, prefixes in entries.items():
        (cache / INDEX_MAPS_DIR / name).mkdir(parents=True)
        (cache / INDEX_MAPS_DIR / name / INDEX_INPUTS_FILE).write_text(json.dumps({"prefixes": prefixes}))
    (cache / INDEX_MAPS_DIR / "foreign").mkdir()  # no inputs.json: not ours to judge
    writer = DatasetWriter(prefix, np.uint16, FakeBuilder())
    writer.add(docs(3))
    writer.close()
    writer.commit({})
    assert sorted(os.listdir(cache / INDEX_MAPS_DIR)) == ["foreign", "theirs"]
    assert os.listdir(cache / TOKEN_STATS_DIR) == [os.path.basename(token_stats_file(other))]
    assert len(writer.removed_caches) == 5
    assert (tmp_path / "other.bin").read_bytes() == b"old" and not (tmp_path / "d_00003.bin").exists()
