"""Checkpoint integrity on disk: manifests (every file with its size and sha256), fsync, atomic pointer
updates, and choosing the newest *valid* checkpoint.

A checkpoint directory is valid only if its ``manifest.json`` exists and every file it lists has the
recorded size and checksum; the manifest is written last, after every rank's files are fsync'ed, and the
directory is renamed into place only after that. Pure Python (no torch or DeepSpeed), so the conversion
tools and the pre-flight checks can use it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LATEST = "latest"
META = "bigtrain.json"
TMP_PREFIX = ".tmp_"
INVALID_SUFFIX = ".invalid"
# Named moments inside a save, in order, where debug.kill_in_save can SIGKILL the process.
SAVE_FAULT_POINTS = (
    "tmp_created",
    "first_engine_file",
    "engine_files",
    "weights",
    "rng",
    "checksums",
    "manifest",
    "renamed",
    "latest",
    "pruned",
)
# Before "renamed" the new checkpoint is not yet in place, so a relaunch must use the previous one.
COMMITTED_AT = SAVE_FAULT_POINTS.index("renamed")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_", 1)[1])


def warn(msg: str) -> None:
    print(f"bigtrain: WARNING: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- durable writes
def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (new files, renames) durable."""
    try:
        fsync_file(path)
    except OSError:  # some file systems refuse fsync on directories; the data itself is synced
        pass


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` so a reader sees the old or the new content, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """fsync ``path`` and describe it for the manifest."""
    fsync_file(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(ckpt: Path, entries: dict[str, dict[str, Any]], step: int) -> None:
    """Complete ``entries`` with any file nobody claimed, fsync every directory, write the manifest."""
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        rel = path.relative_to(ckpt).as_posix()
        if rel != MANIFEST and rel not in entries:
            entries[rel] = file_entry(path)
    for d in [ckpt, *(p for p in ckpt.rglob("*") if p.is_dir())]:
        fsync_dir(d)
    manifest = {"format": 1, "step": step, "files": dict(sorted(entries.items()))}
    write_atomic(ckpt / MANIFEST, json.dumps(manifest, indent=1))


# ---------------------------------------------------------------------------- verification
def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest's file table; raises ValueError naming the problem."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} is missing (the save did not complete)")
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is unreadable ({e})") from None
    return files


def check_files(ckpt: Path, entries: dict[str, dict[str, Any]], checksums: bool = True) -> list[str]:
    """Problems with the listed files, each naming the file."""
    problems = []
    for rel, entry in entries.items():
        path = ckpt / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        elif checksums and sha256_file(path) != entry["sha256"]:
            problems.append(f"{path} fails its sha256 checksum (corrupted)")
    return problems


def verify(ckpt: Path, checksums: bool = True, select: Callable[[str], bool] | None = None) -> list[str]:
    """Every problem found in checkpoint ``ckpt`` (empty: valid). ``select`` limits the files checked."""
    try:
        files = read_manifest(ckpt)
    except ValueError as e:
        return [str(e)]
    if select is not None:
        files = {rel: e for rel, e in files.items() if select(rel)}
    return check_files(ckpt, files, checksums)


def candidate_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags present in ``ckpt_dir``, newest first (temporary and invalidated ones excluded)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [
        p.name
        for p in ckpt_dir.iterdir()
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
    ]
    return sorted(tags, key=step_of, reverse=True)


def newest_valid(
    ckpt_dir: Path, checksums: bool = True, select: Callable[[str], bool] | None = None
) -> str | None:
    """The newest checkpoint that verifies, warning about each newer one that does not."""
    for tag in candidate_tags(ckpt_dir):
        problems = verify(ckpt_dir / tag, checksums, select)
        if not problems:
            return tag
        warn(f"checkpoint {ckpt_dir / tag} is invalid and is skipped: " + "; ".join(problems))
    return None


def latest_pointer(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def set_latest(ckpt_dir: Path, tag: str) -> None:
    write_atomic(ckpt_dir / LATEST, tag)


def invalidate(ckpt_dir: Path, tag: str) -> Path:
    """Move a bad checkpoint aside (kept for inspection, never loaded or counted again)."""
    target = ckpt_dir / f"{tag}{INVALID_SUFFIX}"
    shutil.rmtree(target, ignore_errors=True)
    os.replace(ckpt_dir / tag, target)
    fsync_dir(ckpt_dir)
    return target


def remove_stale_temporaries(ckpt_dir: Path) -> list[str]:
    """Delete what interrupted saves left behind (never a renamed, complete checkpoint), and finish or
    undo an interrupted replacement of a checkpoint by a new save of the same step (:func:`recover_dir`)."""
    removed = []
    if ckpt_dir.is_dir():
        for p in sorted(ckpt_dir.iterdir()):
            if p.name.startswith(TMP_PREFIX) or (p.name.startswith(".latest") and p.name.endswith(".tmp")):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p.name)
            elif p.name.endswith(OLD_SUFFIX) and p.is_dir():
                recover_dir(p.with_name(p.name[: -len(OLD_SUFFIX)]))
    return removed


def prune(ckpt_dir: Path, keep_last: int, protect: Iterable[str]) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints, never one in ``protect``."""
    if keep_last <= 0:
        return []
    keep = set(protect)
    removed = []
    for tag in candidate_tags(ckpt_dir)[keep_last:]:
        if tag not in keep:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            removed.append(tag)
    return removed


# ---------------------------------------------------------------------------- replacing a directory
OLD_SUFFIX = ".old"
# Named moments inside replace_dir, in order, where a test can simulate a crash.
REPLACE_FAULT_POINTS = ("moved_aside", "renamed", "removed")


def recover_dir(final: Path) -> None:
    """Finish or undo an interrupted :func:`replace_dir`: ``final`` missing but ``final.old`` present
    (killed between the two renames): the old directory comes back; both present: the old one is stale."""
    old = final.with_name(final.name + OLD_SUFFIX)
    if not old.is_dir():
        return
    if final.is_dir():
        shutil.rmtree(old)
    else:
        os.replace(old, final)
        fsync_dir(final.parent)
        warn(f"{final} was being replaced when the process stopped; restored the previous one from {old}")


def replace_dir(tmp: Path, final: Path, fault: Callable[[str], None] | None = None) -> None:
    """Put the complete directory ``tmp`` in place of ``final`` (which may not exist). One rename cannot
    replace a non-empty directory, so ``final`` is first renamed to ``final.old``: at every moment
    ``final`` or ``final.old`` is a complete directory, and :func:`recover_dir` (called here first, and
    by readers at start-up) restores ``final`` after a crash between the renames. ``fault(point)``: test
    hook called at each of ``REPLACE_FAULT_POINTS``."""
    fault = fault or (lambda point: None)
    recover_dir(final)
    old = final.with_name(final.name + OLD_SUFFIX)
    if final.is_dir():
        os.replace(final, old)
        fsync_dir(final.parent)
    fault("moved_aside")
    os.replace(tmp, final)
    fsync_dir(final.parent)
    fault("renamed")
    shutil.rmtree(old, ignore_errors=True)
    fault("removed")
