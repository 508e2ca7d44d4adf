"""tools/reshard_checkpoint.py on real checkpoints (the session's trained TP2xPP2 tied and DP2 ZeRO-3 runs,
vocabulary 520: padded 768 at TP2, 640 at TP1): round trips through the layout-free format keep every
master and Adam moment bitwise, refusals name the file or field, and writes are atomic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bigtrain import checkpoint_files as files
from bigtrain.checkpoint import WeightReader
from bigtrain.models import layout
from bigtrain.registry import task_params
from bigtrain.reshard import LAYOUT_FREE, OptimizerState, open_optimizer_state
from tests.tools.conftest import TRUE_VOCAB, tool
from tools import reshard_checkpoint
from tools.reshard_checkpoint import BACKUP_SUFFIX, stage_keys

pytestmark = pytest.mark.slow

SCALARS = ("step", "global_steps", "global_samples", "skipped_steps", "client_state", "frozen")


def _step_dir(checkpoints: Path) -> Path:
    return checkpoints / files.candidate_tags(checkpoints)[0]


def assert_same_state(a: OptimizerState, b: OptimizerState) -> None:
    """Every key's master and moments equal bitwise over the true vocabulary; padding rows zero."""
    assert a.keys() == b.keys() and len(a.keys()) > 0
    for name in SCALARS:
        assert getattr(a, name) == getattr(b, name), name
    assert a.lr_scheduler["last_epoch"] == b.lr_scheduler["last_epoch"]
    for key in a.keys():
        va, vb = a.tensors(key), b.tensors(key)
        for what in va:
            x, y = va[what], vb[what]
            if x.shape != y.shape:  # a vocab-split tensor at another padded size
                assert x.shape[1:] == y.shape[1:], (key, what)
                assert not x[TRUE_VOCAB:].any() and not y[TRUE_VOCAB:].any(), (key, what)
                x, y = x[:TRUE_VOCAB], y[:TRUE_VOCAB]
            assert torch.equal(x, y), (key, what)


def assert_layout_free(out: Path, tensor: int, pipeline: int, dp: int, stage: int, source: Path) -> None:
    """The written directory: valid manifest, bigtrain.json at the target, files per stage as the target's
    pipeline partitioning places the keys, the weights readable by the weights-only reader."""
    assert files.verify(out) == []
    meta = json.loads((out / files.META).read_text())
    assert meta["optimizer_format"] == LAYOUT_FREE
    assert meta["layout"] == {"tensor": tensor, "pipeline": pipeline, "data_parallel": dp}
    cfg = meta["config"]
    assert (cfg["parallel"]["tensor"], cfg["parallel"]["pipeline"], cfg["zero"]["stage"]) == (
        tensor,
        pipeline,
        stage,
    )
    assert cfg["derived"]["data_parallel_size"] == dp
    assert meta["resharded_from"]["path"] == str(source.resolve())
    st = open_optimizer_state(out)
    m = st.config.model
    assert st.padded_vocab_size == cfg["derived"]["padded_vocab_size"] == (768 if tensor == 2 else 640)
    parts = layout.pipeline_parts(
        m, st.padded_vocab_size, tensor, pipeline, st.config.parallel.partition_method
    )
    for s, keys in enumerate(stage_keys(m, task_params(st.config), parts)):
        for t in range(tensor):
            with safe_open(str(out / "weights" / f"tp{t:02d}_pp{s:02d}.safetensors"), "pt") as sf:
                assert sorted(sf.keys()) == sorted(keys)
            with safe_open(str(out / "optim" / f"tp{t:02d}_pp{s:02d}.safetensors"), "pt") as sf:
                assert sorted(sf.keys()) == sorted(
                    f"{w}/{k}" for k in keys for w in ("exp_avg", "exp_avg_sq")
                )
    reader = WeightReader(out)
    for lp in layout.iter_layer_params(m, task=task_params(st.config)):
        assert torch.equal(reader.full(lp), st.tensors(lp.key)["master"]), lp.key


def test_round_trip_tp2pp2_tp1_and_back(trained, tmp_path):
    """TP2xPP2 (tied embeddings: a copy on each end stage) -> TP1 (the real CLI, from the run's
    checkpoints directory) -> TP2xPP2 ZeRO-1 again: bitwise equal to the source at each step."""
    src = _step_dir(trained("tp2pp2"))
    a, b = tmp_path / "tp1" / "step_a", tmp_path / "tp2pp2" / "step_b"
    result = tool("reshard_checkpoint", src.parent, "--tensor", 1, "--pipeline", 1, "--out", a)
    assert f"resharded {src} (TP2 PP2 DP1 ZeRO-0) -> {a} (TP1 PP1 DP1 ZeRO-0)" in result.stdout
    assert_layout_free(a, 1, 1, 1, 0, src)
    assert (
        reshard_checkpoint.main(
            [str(a), "--tensor", "2", "--pipeline", "2", "--zero-stage", "1", "--out", str(b)]
        )
        == 0
    )
    assert_layout_free(b, 2, 2, 1, 1, a)
    source = open_optimizer_state(src)
    assert source.optimizer == "torch" and source.padded_vocab_size == 768
    assert_same_state(source, open_optimizer_state(a))
    back = open_optimizer_state(b)
    assert back.padded_vocab_size == 768 and back.optimizer == LAYOUT_FREE and back.zero_stage == 1
    for key in source.keys():  # the same padded size again: equal in full, padding rows included
        assert all(
            torch.equal(source.tensors(key)[w], back.tensors(key)[w]) for w in ("master", "exp_avg")
        ), key


def test_zero3_to_tp2pp2_zero1(trained, tmp_path):
    """DP2 ZeRO-3 (each parameter split over both ranks' streams) -> TP2xPP2 DP1 ZeRO-1, vocab re-padded."""
    src = _step_dir(trained("dp2-zero3"))
    out = tmp_path / "step"
    argv = [
        str(src),
        "--tensor",
        "2",
        "--pipeline",
        "2",
        "--data-parallel",
        "1",
        "--zero-stage",
        "1",
        "--out",
        str(out),
    ]
    assert reshard_checkpoint.main(argv) == 0
    assert_layout_free(out, 2, 2, 1, 1, src)
    source = open_optimizer_state(src)
    assert source.optimizer == "zero3" and source.padded_vocab_size == 640
    assert_same_state(source, open_optimizer_state(out))


def _copy(checkpoints: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(checkpoints, run / "checkpoints")
    return _step_dir(run / "checkpoints")


def test_in_place_keeps_the_original_aside(trained, tmp_path):
    step = _copy(trained("dp2-zero3"), tmp_path)
    assert (
        reshard_checkpoint.main([str(step.parent.parent), "--tensor", "2", "--pipeline", "1", "--in-place"])
        == 0
    )
    backup = step.with_name(step.name + BACKUP_SUFFIX)
    assert files.candidate_tags(step.parent) == [step.name]  # the original is no resumable tag
    assert files.newest_valid(step.parent) == step.name
    assert_layout_free(step, 2, 1, 2, 3, backup)  # resharded_from names the kept original
    assert (
        files.verify(backup) == []
        and json.loads((backup / files.META).read_text()).get("optimizer_format") is None
    )
    assert_same_state(open_optimizer_state(backup), open_optimizer_state(step))
    # a second in-place reshard would overwrite the kept original: refused
    assert reshard_checkpoint.main([str(step), "--tensor", "1", "--pipeline", "1", "--in-place"]) == 2


def _refused(capsys, argv: list[str]) -> str:
    assert reshard_checkpoint.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_refuses_a_truncated_file(trained, tmp_path, capsys):
    step = _copy(trained("dp2-zero3"), tmp_path)
    victim = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    err = _refused(capsys, [str(step), "--tensor", "2", "--pipeline", "1", "--out", str(out)])
    assert f"{victim} has {len(data) // 2} bytes, the manifest says {len(data)} (truncated?)" in err
    assert not out.exists() and not any(p.name.startswith(files.TMP_PREFIX) for p in tmp_path.iterdir())


def test_refuses_a_checkpoint_without_manifest_or_with_a_missing_file(trained, tmp_path, capsys):
    step = _copy(trained("dp2-zero3"), tmp_path)
    argv = [str(step), "--tensor", "2", "--pipeline", "1", "--out", str(tmp_path / "out")]
    manifest = step / files.MANIFEST
    saved = manifest.read_text()
    manifest.unlink()
    assert f"{manifest} is missing" in _refused(capsys, argv)
    # a DeepSpeed file gone and dropped from the manifest too (the manifest checks out): named on open
    entries = json.loads(saved)
    victim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    del entries["files"][victim]
    manifest.write_text(json.dumps(entries))
    (step / victim).unlink()
    assert f"{step / victim}: missing" in _refused(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_refuses_an_impossible_target(trained, tmp_path, capsys):
    src = _step_dir(trained("dp2-zero3"))
    err = _refused(capsys, [str(src), "--tensor", "4", "--pipeline", "1", "--out", str(tmp_path / "o")])
    assert "model.num_kv_heads 2 is not divisible by parallel.tensor 4" in err
    err = _refused(
        capsys,
        [str(src), "--tensor", "1", "--pipeline", "2", "--zero-stage", "3", "--out", str(tmp_path / "o")],
    )
    assert "zero.stage 3 cannot be combined with parallel.pipeline 2" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("in_place", [False, True])
def test_an_interrupted_write_leaves_no_resumable_tag(trained, tmp_path, in_place):
    """A failure half-way through the parameters (as a crash would leave things): the source untouched
    and verified, no new step_* directory, no kept original, no temporary left by the tool."""
    step = _copy(trained("dp2-zero3"), tmp_path)
    ckpt_dir = step.parent
    listing = sorted(p.name for p in ckpt_dir.rglob("*"))
    written: list[str] = []

    def crash(key: str) -> None:
        written.append(key)
        if len(written) == 5:
            raise KeyboardInterrupt("simulated kill")

    out = None if in_place else ckpt_dir / "step_00000099"
    with pytest.raises(KeyboardInterrupt):
        reshard_checkpoint.reshard(step, 2, 1, out=out, in_place=in_place, progress=crash)
    assert len(written) == 5
    assert sorted(p.name for p in ckpt_dir.rglob("*")) == listing
    assert files.candidate_tags(ckpt_dir) == [step.name] and files.verify(step) == []
    assert json.loads((step / files.META).read_text()).get("optimizer_format") is None
