"""Issue 17 acceptance, end to end: a run saved at step 10 at one layout (tensor x pipeline x data
parallel, ZeRO stage) and relaunched at another continues the uninterrupted run's steps 11-20 exactly,
Adam's moments included (docs/design/reshard.md §5).

One uninterrupted 20-step reference per source layout (checkpoints at 10 and 20), run once on first use
and shared by every resume from it. A resume copies the reference's run directory back to step 10 (what
a kill after that save leaves) and relaunches it at the target layout with ``debug.check_reshard=true``:
every rank reads the injected masters and moments back from its live optimizer and compares them
bitwise with the checkpoint's (acceptance 2, inside the run); the relaunch's step-20 optimizer state is
then compared with the reference's. A control relaunch injecting zero moments shows both comparisons
can fail."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint import latest_tag, list_tags
from bigtrain.checkpoint_files import set_latest
from bigtrain.models import layout
from bigtrain.reshard import OptimizerState, read_optimizer_state
from tests.finetune.helpers import SFT_TINY, make_tokenizer, reverse_rows, reverse_split, write_jsonl
from tests.training.helpers import (
    assert_close_rel,
    assert_refused_before_start_up,
    metrics,
    single,
    torchrun,
    train_args,
    write_corpus,
)

pytestmark = pytest.mark.slow

STEPS, SAVED = 20, 10
# warmup 3 then cosine to min_lr: the moments carry 10 steps of history into a still-large LR
COMMON = ["optim.warmup_steps=3", f"checkpoint.interval={SAVED}", "checkpoint.keep_last=2"]
# the fine-tuning runs: python -m bigtrain.finetune, sft-tiny from scratch, LoRA adapters only trained
LORA = ["finetune.lora.rank=4", "finetune.lora.dropout=0", "optim.lr=0.01", "optim.min_lr=0.001"]

# source name -> (processes, overrides, what the pre-flight line calls its layout)
SOURCES = {
    "tp2": (2, ["parallel.tensor=2"], "TP2 PP1 DP1 ZeRO-0"),
    "dp1": (1, [], "TP1 PP1 DP1 ZeRO-0"),
    "pp2": (2, ["parallel.pipeline=2"], "TP1 PP2 DP1 ZeRO-0"),
    "dp2z1": (2, ["zero.stage=1"], "TP1 PP1 DP2 ZeRO-1"),
    "dp2z3": (2, ["zero.stage=3"], "TP1 PP1 DP2 ZeRO-3"),
    "tp2pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"], "TP2 PP2 DP1 ZeRO-0"),
    "lora_tp2": (2, ["parallel.tensor=2"], "TP2 PP1 DP1 ZeRO-0 vocab 512"),  # its 310 tokens pad per TP
}
# (id, source, target processes, target overrides, the target's layout in the pre-flight line)
PAIRS = [
    ("tp2-to-tp1dp2", "tp2", 2, [], "TP1 PP1 DP2 ZeRO-0"),
    ("tp1-to-tp2", "dp1", 2, ["parallel.tensor=2"], "TP2 PP1 DP1 ZeRO-0"),
    ("pp2-to-pp1", "pp2", 1, [], "TP1 PP1 DP1 ZeRO-0"),
    ("pp1-to-pp2", "dp1", 2, ["parallel.pipeline=2"], "TP1 PP2 DP1 ZeRO-0"),
    ("dp2z1-to-dp1z0", "dp2z1", 1, ["zero.stage=0"], "TP1 PP1 DP1 ZeRO-0"),
    ("dp2z3-to-dp2z1", "dp2z3", 2, ["zero.stage=1"], "TP1 PP1 DP2 ZeRO-1"),
    ("tp2pp2-to-dp4z1", "tp2pp2", 4, ["zero.stage=1"], "TP1 PP1 DP4 ZeRO-1"),
    ("lora-tp2-to-tp1", "lora_tp2", 1, [], "TP1 PP1 DP1 ZeRO-0 vocab 384"),
]


class References:
    """Each source layout's uninterrupted run, trained on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.corpus = write_corpus(root / "data" / "train")
        self.sft: Path | None = None

    def args(self, source: str, run_dir: Path, *overrides: str) -> list[str]:
        """The reference's command line with the layout ``overrides`` (the source's or a target's)."""
        if not source.startswith("lora"):
            return train_args(self.corpus, run_dir, *COMMON, *overrides, steps=STEPS)
        if self.sft is None:
            make_tokenizer(self.root)
            self.sft = write_jsonl(self.root / "sft.jsonl", reverse_rows(reverse_split(100, 0)[0]))
        return ["--config", SFT_TINY, "--set", f"data.tokenizer={self.root / 'tokenizer'}",
                f"finetune.train={self.sft}", "finetune.valid=null", f"train.run_dir={run_dir}",
                f"train.steps={STEPS}", "train.eval_interval=0", "train.log_interval=1", *COMMON, *LORA,
                *overrides]  # fmt: skip

    def run_dir(self, source: str) -> Path:
        run = self.root / source
        if not (run / "checkpoints" / f"step_{STEPS:08d}").is_dir():
            nproc, overrides, _ = SOURCES[source]
            launch(nproc, self.args(source, run, *overrides), source)
            assert list_tags(run / "checkpoints") == [f"step_{SAVED:08d}", f"step_{STEPS:08d}"]
        return run

    def saved(self, source: str) -> Path:
        return self.run_dir(source) / "checkpoints" / f"step_{SAVED:08d}"

    def cut(self, source: str, dest: Path) -> Path:
        """A copy of the reference's run directory as a kill after the step-10 save leaves it."""
        shutil.copytree(self.run_dir(source), dest)
        shutil.rmtree(dest / "checkpoints" / f"step_{STEPS:08d}")
        set_latest(dest / "checkpoints", f"step_{SAVED:08d}")
        assert latest_tag(dest / "checkpoints") == f"step_{SAVED:08d}"
        # metrics.jsonl is appended to: without the reference's rows, every row read is the relaunch's
        (dest / "metrics.jsonl").unlink()
        return dest

    def resume(self, source: str, dest: Path, nproc: int, *overrides: str):
        """Relaunch the reference cut back to step 10 at the layout ``overrides``."""
        return launch(nproc, self.args(source, self.cut(source, dest), *overrides), source)


def launch(nproc: int, args: list[str], source: str):
    module = "bigtrain.finetune" if source.startswith("lora") else "bigtrain.pretrain"
    if nproc == 1:
        return single(args, timeout=420, module=module)
    return torchrun(nproc, args, timeout=600, module=module)


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> References:
    return References(tmp_path_factory.mktemp("reshard_resume"))


def resumed_rows(run: Path) -> list[dict]:
    """The relaunch's training rows, steps 11-20."""
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(SAVED + 1, STEPS + 1)), rows
    return rows


@pytest.mark.parametrize(
    ("source", "nproc", "overrides", "into"),
    [pytest.param(*p[1:], id=p[0]) for p in PAIRS],
)
def test_resume_at_another_layout_continues_the_run(refs, source, nproc, overrides, into, tmp_path):
    out = refs.resume(source, tmp_path / "run", nproc, *overrides, "debug.check_reshard=true")
    text = out.stdout + out.stderr
    saved_at = SOURCES[source][2]
    line = f"resuming step_{SAVED:08d} saved at {saved_at} into {into} (resharding optimizer state)"
    assert text.count(line) == 1, (line, text[-4000:])
    assert f"resumed from step {SAVED}" in text
    # acceptance 2 inside the run: every trainable parameter's master and moments read back bitwise
    trained = len(read_optimizer_state(refs.saved(source)).keys())
    verdicts = re.findall(r"debug\.check_reshard: (\d+) parameters x 3 states bitwise equal", text)
    assert verdicts == [str(trained)], (trained, verdicts, text[-4000:])

    reference = {r["step"]: r for r in metrics(refs.run_dir(source))}
    resumed = resumed_rows(tmp_path / "run")
    expected = [reference[r["step"]] for r in resumed]
    worst = assert_close_rel([r["loss"] for r in resumed], [r["loss"] for r in expected], 1e-5)
    print(f"{source} -> {into}: steps 11-20 max relative loss difference {worst:.1e}")
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in expected], rel=1e-12)
    assert [r["consumed_samples"] for r in resumed] == [r["consumed_samples"] for r in expected]

    # the step-20 checkpoint: saved at the target layout, its optimizer state the reference's (measured
    # <= 1.3e-6 of each tensor's largest value: the new layout's reduction order; a lost moment is O(1))
    end = read_optimizer_state(tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}")
    sizes = re.fullmatch(r"TP(\d+) PP(\d+) DP(\d+) ZeRO-(\d+)(?: vocab \d+)?", into)
    assert sizes is not None
    assert end.layout == dict(zip(("tensor", "pipeline", "data_parallel"), map(int, sizes.groups()[:3])))
    assert end.zero_stage == int(sizes.group(4)) and end.step == STEPS
    assert end.client_state["consumed_samples"] == resumed[-1]["consumed_samples"]
    for what, worst in state_difference(end, refs.run_dir(source)).items():
        print(f"  step-20 {what}: max difference {worst:.1e} of the tensor's largest value")
        assert worst <= 1e-5, (what, worst)


def state_difference(end: OptimizerState, reference: Path) -> dict[str, float]:
    """Per state (master, exp_avg, exp_avg_sq): the largest difference from the reference's step-20
    checkpoint, relative to each tensor's largest value, worst over the keys."""
    ref = read_optimizer_state(reference / "checkpoints" / f"step_{STEPS:08d}")
    assert end.keys() == ref.keys() and ref.step == STEPS
    worst = dict.fromkeys(("master", "exp_avg", "exp_avg_sq"), 0.0)
    for key in ref.keys():
        for what, b in ref.tensors(key).items():
            a = end.tensors(key)[what]
            worst[what] = max(worst[what], ((a - b).abs().max() / b.abs().max()).item())
    return worst


def test_zeroed_moments_change_the_curve(refs, tmp_path):
    """Control: the TP2 -> TP1 DP2 relaunch injecting zero Adam moments (what a weights-only load keeps)
        leaves steps 11-20 more than 1e-3 relative away from the reference somewhere, and the step-20 second
    moments too (the state comparison above can fail)."""
    refs.resume("tp2", tmp_path / "run", 2, "debug.reshard_zero_moments=true")
    reference = {r["step"]: r["loss"] for r in metrics(refs.run_dir("tp2"))}
    resumed = resumed_rows(tmp_path / "run")
    worst = max(abs(r["loss"] - reference[r["step"]]) / reference[r["step"]] for r in resumed)
    print(f"zeroed moments: steps 11-20 max relative loss difference {worst:.1e}")
    assert worst > 1e-3, f"zeroed moments moved steps 11-20 by at most {worst:.1e} relative"
    end = read_optimizer_state(tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}")
    moments = state_difference(end, refs.run_dir("tp2"))
    print(f"zeroed moments: step-20 state differences {moments}")
    assert moments["exp_avg_sq"] > 1e-3, moments


def test_moments_shard_and_merge_bitwise_at_the_target(refs):
    """No launch: the TP1 step-10 state (the source of TP1 -> TP2) split into the target's two tensor
    ranks by layout.shard and merged back is bitwise the same, every key and state; the slices of a
    split parameter are halves (a replicated one: the whole tensor on both)."""
    state = read_optimizer_state(refs.saved("dp1"))
    specs = {lp.key: lp.spec for lp in layout.iter_layer_params(state.config.model)}
    assert sorted(state.keys()) == sorted(specs)
    for key in state.keys():
        split = specs[key].split
        for what, full in state.tensors(key).items():
            shards = [layout.shard(full, split, rank, 2) for rank in range(2)]
            halves = split != "replicated"
            assert all(s.numel() == full.numel() // (2 if halves else 1) for s in shards), (key, what)
            assert torch.equal(layout.merge(shards, split, key), full), (key, what)


@pytest.mark.parametrize(
    ("change", "needle"),
    [("model.num_layers=3", "model.num_layers: checkpoint 2 vs config 3"),
     ("model.vocab_size=1024", "model.vocab_size: checkpoint 512 vs config 1024")],
    ids=["num-layers", "vocab"],
)  # fmt: skip
def test_another_shape_at_another_layout_is_refused(refs, change, needle, tmp_path):
    """A resharding relaunch (TP1 -> TP2) that also changes the model's shape or vocabulary: refused in
    pre-flight (no process group) naming the field, the checkpoint untouched."""
    run = refs.cut("dp1", tmp_path / "run")
    args = refs.args("dp1", run, "parallel.tensor=2", change)
    out = torchrun(2, args, timeout=300, check=False, no_start_up=True)
    assert_refused_before_start_up(out, needle, returncode=None)
    assert list_tags(run / "checkpoints") == [f"step_{SAVED:08d}"]


def test_offline_reshard_tool_then_relaunch(refs, tmp_path):
    """tools/reshard_checkpoint.py --in-place prepares the TP2 step-10 checkpoint for TP1 DP2 ahead of the
    relaunch (the original kept beside it, not resumable); the relaunch at that layout reads the tool's
    layout-free files (pre-flight says where they came from) and continues the reference's steps 11-20."""
    import subprocess
    import sys

    run = refs.cut("tp2", tmp_path / "run")
    step = run / "checkpoints" / f"step_{SAVED:08d}"
    tool = [sys.executable, "tools/reshard_checkpoint.py", str(step), "--tensor", "1", "--pipeline", "1"]
    done = subprocess.run([*tool, "--data-parallel", "2", "--in-place"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "checkpoints" / f"step_{SAVED:08d}.pre_reshard").is_dir()
    assert list_tags(run / "checkpoints") == [f"step_{SAVED:08d}"]
    out = launch(2, refs.args("tp2", run, "debug.check_reshard=true"), "tp2")
    line = (
        f"resuming step_{SAVED:08d} saved at TP1 PP1 DP2 ZeRO-0 (resharded offline from TP2 PP1) into "
        "TP1 PP1 DP2 ZeRO-0 (resharding optimizer state)"
    )
    assert line in out.stdout and "debug.check_reshard: 15 parameters x 3 states bitwise equal" in out.stdout
    reference = {r["step"]: r for r in metrics(refs.run_dir("tp2"))}
    resumed = resumed_rows(run)
    assert_close_rel([r["loss"] for r in resumed], [reference[r["step"]]["loss"] for r in resumed], 1e-5)
    assert [r["consumed_samples"] for r in resumed] == [
        reference[r["step"]]["consumed_samples"] for r in resumed
    ]
