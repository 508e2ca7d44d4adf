"""Checkpoint integrity on disk: manifests catch truncation, corruption and missing files; retention
never deletes a protected checkpoint; leftovers of interrupted saves are cleaned."""

from __future__ import annotations

import json
from pathlib import Path

from bigtrain import checkpoint_files as files


def make_checkpoint(root: Path, step: int, payload: bytes = b"x" * 1000) -> Path:
    ckpt = root / files.tag_for(step)
    (ckpt / "weights").mkdir(parents=True)
    (ckpt / "weights" / "tp00_pp00.safetensors").write_bytes(payload)
    (ckpt / "optim.pt").write_bytes(payload[::-1] + b"tail")
    (ckpt / files.META).write_text(json.dumps({"step": step}))
    entries = {"optim.pt": files.file_entry(ckpt / "optim.pt")}  # one claimed by a rank, the rest swept
    files.write_manifest(ckpt, entries, step)
    return ckpt


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    ckpt = make_checkpoint(tmp_path, 5)
    manifest = json.loads((ckpt / files.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["bigtrain.json", "optim.pt", "weights/tp00_pp00.safetensors"]
    assert manifest["files"]["optim.pt"]["bytes"] == 1004
    assert files.verify(ckpt) == []


def test_flipped_byte_truncation_and_missing_file_are_named(tmp_path):
    ckpt = make_checkpoint(tmp_path, 5)
    shard = ckpt / "weights" / "tp00_pp00.safetensors"
    data = bytearray(shard.read_bytes())
    data[500] ^= 0x01
    shard.write_bytes(bytes(data))
    (problem,) = files.verify(ckpt)
    assert str(shard) in problem and "checksum" in problem
    assert files.verify(ckpt, checksums=False) == []  # same size: only the checksum sees a flipped bit

    (ckpt / "optim.pt").write_bytes(b"short")
    problems = files.verify(ckpt)
    assert any(str(ckpt / "optim.pt") in p and "truncated" in p for p in problems)
    (ckpt / "optim.pt").unlink()
    assert any("optim.pt is missing" in p for p in files.verify(ckpt))
    # a select limits what is checked (weight readers check only the weights)
    assert files.verify(ckpt, select=lambda rel: rel == files.META) == []


def test_a_checkpoint_without_manifest_is_incomplete(tmp_path):
    ckpt = make_checkpoint(tmp_path, 5)
    (ckpt / files.MANIFEST).unlink()
    (problem,) = files.verify(ckpt)
    assert "manifest.json is missing" in problem


def test_newest_valid_skips_bad_ones_loudly(tmp_path, capsys):
    for step in (5, 10, 15):
        make_checkpoint(tmp_path, step)
    (tmp_path / files.tag_for(15) / "optim.pt").write_bytes(b"")
    (tmp_path / ".tmp_step_00000020").mkdir()  # an interrupted save is never a candidate
    assert files.candidate_tags(tmp_path) == ["step_00000015", "step_00000010", "step_00000005"]
    assert files.newest_valid(tmp_path) == "step_00000010"
    assert "step_00000015 is invalid" in capsys.readouterr().err


def test_invalidate_moves_aside_and_cleanup_removes_temporaries(tmp_path):
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 10)
    moved = files.invalidate(tmp_path, "step_00000010")
    assert moved.name == "step_00000010.invalid" and moved.is_dir()
    assert files.candidate_tags(tmp_path) == ["step_00000005"]
    (tmp_path / ".tmp_step_00000015" / "x").mkdir(parents=True)
    (tmp_path / ".latest.tmp").write_text("step_00000015")
    assert sorted(files.remove_stale_temporaries(tmp_path)) == [".latest.tmp", ".tmp_step_00000015"]
    assert (tmp_path / "step_00000005").is_dir()


def test_retention_keeps_the_newest_and_the_protected(tmp_path):
    for step in (5, 10, 15, 20):
        make_checkpoint(tmp_path, step)
    removed = files.prune(tmp_path, keep_last=2, protect=["step_00000005"])
    assert removed == ["step_00000010"]
    assert files.candidate_tags(tmp_path) == ["step_00000020", "step_00000015", "step_00000005"]
    assert files.prune(tmp_path, keep_last=0, protect=[]) == []  # 0 keeps everything


def test_latest_pointer_is_replaced_atomically(tmp_path):
    files.set_latest(tmp_path, "step_00000005")
    files.set_latest(tmp_path, "step_00000010")
    assert files.latest_pointer(tmp_path) == "step_00000010"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_resaving_a_step_survives_a_crash_at_every_moment_of_the_swap(tmp_path, capsys):
    """A save of a step already on disk (after a rollback) goes through replace_dir: killed after the
    old checkpoint is moved aside, start-up's cleanup restores it; killed after the new one is in
    place, the leftover is removed; either way a complete checkpoint of that step verifies."""

    class Crash(Exception):
        pass

    for point in files.REPLACE_FAULT_POINTS:
        root = tmp_path / point
        old = make_checkpoint(root, 10, payload=b"old" * 100)
        new = make_checkpoint(root / "staging", 10, payload=b"new" * 100)

        def crash(at: str, point: str = point) -> None:
            if at == point:
                raise Crash(at)

        try:
            files.replace_dir(new, old, fault=crash)
        except Crash:
            pass
        files.remove_stale_temporaries(root)
        assert sorted(p.name for p in root.iterdir() if p.name != "staging") == ["step_00000010"], point
        assert files.newest_valid(root) == "step_00000010", point
        expected = b"old" * 100 if point == "moved_aside" else b"new" * 100
        assert (old / "weights" / "tp00_pp00.safetensors").read_bytes() == expected, point
    assert "restored the previous one" in capsys.readouterr().err
