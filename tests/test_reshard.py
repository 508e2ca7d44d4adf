"""bigtrain.reshard.open_optimizer_state / read_optimizer_state on real checkpoints: the tiny model trained 2 steps from the same
seed and data at several layouts (DP2 ZeRO-0/1/2/3, TP2 ZeRO-0/1, PP2, TP2xPP2, bf16 and fp16 ZeRO-1,
tied embeddings at PP2 ZeRO-0/1, padded groups, DP3, frozen parameters), one run per layout shared by
every assertion."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint import WeightReader
from bigtrain.models import layout
from bigtrain.registry import task_params
from bigtrain.reshard import WHAT, OptimizerState, open_optimizer_state, read_optimizer_state
from tests.finetune.helpers import SFT_TINY, make_tokenizer, reverse_rows, reverse_split, write_jsonl
from tests.training.helpers import single, torchrun, train_args, write_corpus

pytestmark = pytest.mark.slow

PAD = [
    "model.hidden_size=66",
    "model.num_attention_heads=3",
    "model.num_kv_heads=3",
    "model.ffn_hidden_size=130",
]
# name -> (processes, overrides); "dp1" is the reference every other layout is compared with
LAYOUTS = {
    "dp1": (1, []),
    "dp2z0": (2, ["zero.stage=0"]),
    "dp2z1": (2, ["zero.stage=1"]),
    "dp2z2": (2, ["zero.stage=2"]),
    "dp2z3": (2, ["zero.stage=3"]),
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "tp2pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "dp2bf16": (2, ["zero.stage=1", "precision=bf16"]),
    "dp2fp16": (2, ["zero.stage=1", "precision=fp16"]),
    "tp2z1": (2, ["parallel.tensor=2", "zero.stage=1"]),
    "dp1tied": (1, ["model.tie_embeddings=true"]),
    "pp2z0tied": (2, ["parallel.pipeline=2", "model.tie_embeddings=true"]),
    "pp2z1tied": (2, ["parallel.pipeline=2", "zero.stage=1", "model.tie_embeddings=true"]),
    # hidden 66: the 1-D group (5 x 66 elements) is padded to 2 x DP, so the last rank's partition is short
    "dp1pad": (1, [*PAD]),
    "dp2z1pad": (2, ["zero.stage=1", *PAD]),
    "dp2bf16pad": (2, ["zero.stage=1", "precision=bf16", *PAD]),
    # DP3: ZeRO-3 pads every parameter whose size is not a multiple of 3
    "dp3z0": (3, ["zero.stage=0", "train.global_batch_size=6"]),
    "dp3z3": (3, ["zero.stage=3", "train.global_batch_size=6"]),
}
KINDS = {  # the optimizer DeepSpeed ran; the rest: torch's (ZeRO-0)
    "dp2z1": "zero",
    "dp2z2": "zero",
    "dp2z3": "zero3",
    "dp2bf16": "bf16",
    "dp2fp16": "zero",
    "tp2z1": "zero",
    "pp2z1tied": "zero",
    "dp2z1pad": "zero",
    "dp2bf16pad": "bf16",
    "dp3z3": "zero3",
}
# fine-tuning (python -m bigtrain.finetune, sft-tiny, DP2) with frozen parameters: LoRA trains only its
# adapters; freeze_layers/freeze_embeddings freeze the embedding and block 1
FINETUNE = {
    "lora_z0": ["zero.stage=0", "finetune.lora.rank=4"],
    "lora_z1": ["zero.stage=1", "finetune.lora.rank=4"],
    "freeze_z0": ["zero.stage=0", "finetune.freeze_layers=1", "finetune.freeze_embeddings=true"],
}
STEPS = 2


class Runs:
    """Trains each layout once, on first use; checkpoints and their extraction are cached."""

    def __init__(self, root: Path):
        self.root = root
        self.corpus = write_corpus(root / "data" / "train")
        self.states: dict[str, OptimizerState] = {}

    def _finetune(self, name: str) -> None:
        sft = self.root / "sft.jsonl"
        if not sft.is_file():
            make_tokenizer(self.root)
            write_jsonl(sft, reverse_rows(reverse_split(100, 0)[0]))
        args = ["--config", SFT_TINY, "--set", f"data.tokenizer={self.root / 'tokenizer'}",
                f"finetune.train={sft}", "finetune.valid=null", f"train.run_dir={self.root / name}",
                f"train.steps={STEPS}", "train.eval_interval=0", *FINETUNE[name]]  # fmt: skip
        torchrun(2, args, module="bigtrain.finetune")

    def checkpoint(self, name: str) -> Path:
        ckpt = self.root / name / "checkpoints" / f"step_{STEPS:08d}"
        if not ckpt.is_dir() and name in FINETUNE:
            self._finetune(name)
        elif not ckpt.is_dir():
            nproc, overrides = LAYOUTS[name]
            args = train_args(self.corpus, self.root / name, *overrides, steps=STEPS)
            if nproc == 1:
                single(args)
            else:
                torchrun(nproc, args)
        return ckpt

    def state(self, name: str) -> OptimizerState:
        if name not in self.states:
            self.states[name] = read_optimizer_state(self.checkpoint(name))
        return self.states[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("reshard"))


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over a tensor, relative to the tensor's largest |b|, worst over keys."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_masters_equal_weights_and_moments_are_full(runs, name):
    st = runs.state(name)
    cfg = st.config
    reader = WeightReader(runs.checkpoint(name))
    keys = [lp.key for lp in layout.iter_layer_params(cfg.model, task=task_params(cfg))]
    assert sorted(st.master) == sorted(keys) == sorted(st.exp_avg) == sorted(st.exp_avg_sq)
    assert st.frozen == []
    assert st.optimizer == KINDS.get(name, "torch")
    for lp in layout.iter_layer_params(cfg.model, task=task_params(cfg)):
        # (1) the extracted masters are the checkpoint's own layout-free weights, bitwise
        assert torch.equal(st.master[lp.key], reader.full(lp)), lp.key
        shape = layout.full_shape(lp.spec, cfg.model, st.padded_vocab_size)
        for moments in (st.exp_avg, st.exp_avg_sq):  # (2) present, full shape, non-zero
            assert tuple(moments[lp.key].shape) == shape, lp.key
            assert moments[lp.key].dtype == torch.float32
            assert moments[lp.key].abs().sum() > 0, lp.key
        assert (st.exp_avg_sq[lp.key] >= 0).all()
    assert st.step == STEPS and st.global_steps == STEPS
    assert (
        st.client_state["step"] == STEPS
        and st.client_state["consumed_samples"] == cfg.train.global_batch_size * STEPS
    )
    assert st.lr_scheduler is not None and st.lr_scheduler["last_epoch"] == STEPS
    assert st.layout["data_parallel"] * st.layout["tensor"] * st.layout["pipeline"] == LAYOUTS[name][0]


# Measured (fp32, 2 steps, tiny, CPU/gloo): the same gradient sums in the same order agree to <= 1.2e-6
# of each tensor's largest value (DP2 ZeRO-0 vs ZeRO-1, DP1 vs PP2, tied embeddings DP1 vs PP2 ZeRO-0/1)
# and TP2 vs TP2xPP2 bitwise; another reduction order (DP1 vs DP2, ZeRO-2/3's buckets, TP2's split
# matmuls) moves the moments up to ~8e-5 (elements with tiny gradients). A misplaced slice would differ by
# O(1).
SAME_ORDER = 5e-6
OTHER_ORDER = 3e-4


@pytest.mark.parametrize(
    ("a", "b", "tol"),
    [
        ("dp2z1", "dp2z0", SAME_ORDER),
        ("pp2", "dp1", SAME_ORDER),
        ("tp2pp2", "tp2", 0.0),
        ("tp2z1", "tp2", SAME_ORDER),
        ("pp2z0tied", "dp1tied", SAME_ORDER),
        ("pp2z1tied", "dp1tied", SAME_ORDER),
        ("dp2z0", "dp1", OTHER_ORDER),
        ("dp2z2", "dp2z0", OTHER_ORDER),
        ("dp2z3", "dp2z0", OTHER_ORDER),
        ("tp2", "dp1", OTHER_ORDER),
        ("dp2z1pad", "dp1pad", OTHER_ORDER),
        ("dp3z3", "dp3z0", OTHER_ORDER),
        ("lora_z1", "lora_z0", SAME_ORDER),
    ],
)
def test_same_moments_at_another_layout(runs, a, b, tol):
    sa, sb = runs.state(a), runs.state(b)
    for what in ("exp_avg", "exp_avg_sq"):
        worst = _rel(getattr(sa, what), getattr(sb, what))
        assert worst <= tol, f"{a} vs {b}: {what} differs by {worst:.2e} (relative to max) > {tol:.0e}"


@pytest.mark.parametrize("name", list(FINETUNE))
def test_frozen_parameters_are_left_out(runs, name):
    """Only what the task trains has optimizer state: LoRA's adapters, or what freezing leaves (blocks 2..
    and the head); each is extracted like the others, the frozen keys are listed."""
    st = runs.state(name)
    cfg = st.config
    params = list(layout.iter_layer_params(cfg.model, task=task_params(cfg)))
    if cfg.finetune.lora.rank:
        trained = [lp.key for lp in params if layout.is_added(lp.spec)]
    else:
        trained = [lp.key for lp in params if lp.index >= 2]
    assert 0 < len(trained) < len(params)
    assert sorted(st.master) == sorted(st.exp_avg) == sorted(trained)
    assert sorted(st.frozen) == sorted(lp.key for lp in params if lp.key not in trained)
    reader = WeightReader(runs.checkpoint(name))
    for lp in params:
        if lp.key in trained:
            assert torch.equal(st.master[lp.key], reader.full(lp)), lp.key
            assert st.exp_avg_sq[lp.key].shape == st.master[lp.key].shape, lp.key
            assert st.exp_avg_sq[lp.key].abs().sum() > 0, lp.key
    assert st.step == STEPS


def test_loss_scaler_only_where_fp16(runs):
    scaler = runs.state("dp2fp16").loss_scaler
    assert scaler is not None and scaler.dynamic and scaler.cur_iter == STEPS and scaler.cur_scale > 1
    assert runs.state("dp2z1").loss_scaler is None and runs.state("dp2bf16").loss_scaler is None


@pytest.mark.parametrize(("name", "prefix"), [("dp2z1pad", ""), ("dp2bf16pad", "bf16_")])
def test_padded_layouts_are_padded(runs, name, prefix):
    """The pad layouts exercise what they are for: the last rank's 1-D group carries padding."""
    path = runs.checkpoint(name) / f"{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert torch.load(path, weights_only=False)["optimizer_state_dict"]["group_paddings"] == [0, 2]


def test_coverage_check_names_a_removed_parameter(runs, tmp_path):
    """Control: a ZeRO-1 checkpoint from which the last parameter of a group (final_norm.weight) is cut
    out cleanly (its name and its elements from the last rank's partition): every flat size still adds
    up, and only the coverage check can notice."""
    ckpt = tmp_path / "step"
    shutil.copytree(runs.checkpoint("dp2z1"), ckpt)
    model_file = ckpt / "mp_rank_00_model_states.pt"
    states = torch.load(model_file, weights_only=False)
    group = states["param_shapes"][1]
    name, shape = list(group.items())[-1]
    assert name == "final_norm.weight"
    del group[name]
    torch.save(states, model_file)
    for rank in (0, 1):
        optim_file = ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        optim = torch.load(optim_file, weights_only=False)
        osd = optim["optimizer_state_dict"]
        osd["param_alignment_paddings"][1].pop()  # every rank records the group's per-parameter paddings
        if rank == 1:  # the last rank's partition ends with the parameter's elements
            n = shape.numel()
            osd["single_partition_of_fp32_groups"][1] = osd["single_partition_of_fp32_groups"][1][:-n]
            for s in ("exp_avg", "exp_avg_sq"):
                osd["base_optimizer_state"]["state"][1][s] = osd["base_optimizer_state"]["state"][1][s][:-n]
        torch.save(optim, optim_file)
    m = runs.state("dp2z1").config.model
    (key,) = [lp.key for lp in layout.iter_layer_params(m, [m.num_layers + 1])]  # the final norm's
    with pytest.raises(ValueError, match=rf"does not cover the model exactly once: missing \['{key}'\]"):
        read_optimizer_state(ckpt)


def test_refuses_what_it_cannot_name(runs, tmp_path):
    """A ZeRO-0 optimizer whose groups do not match bigtrain's param_groups over the saved module (one
    parameter's state dropped) is refused, naming the file, rather than guessed."""
    ckpt = tmp_path / "step"
    shutil.copytree(runs.checkpoint("dp2z0"), ckpt)
    model_file = ckpt / "mp_rank_00_model_states.pt"
    states = torch.load(model_file, weights_only=False)
    last = states["optimizer"]["param_groups"][1]["params"].pop()
    del states["optimizer"]["state"][last]
    torch.save(states, model_file)
    with pytest.raises(
        ValueError, match="mp_rank_00_model_states.pt: optimizer groups hold .* cannot name them"
    ):
        read_optimizer_state(ckpt)


def test_missing_file_is_named(runs, tmp_path):
    ckpt = tmp_path / "step"
    shutil.copytree(runs.checkpoint("dp2z3"), ckpt)
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"):
        read_optimizer_state(ckpt)


def _mapped(ckpt: Path) -> list[str]:
    """Lines of /proc/self/maps that map a file of ``ckpt``."""
    with open("/proc/self/maps") as f:
        return [line for line in f if str(ckpt.resolve()) in line]


@pytest.mark.parametrize(
    "name", ["dp2z1pad", "dp2z3", "dp3z3", "tp2pp2", "pp2z0tied", "dp2bf16pad", "lora_z1"]
)
def test_per_key_reads_are_independent_and_unmap_the_files(runs, name):
    """The lazy reader, one key and one tensor at a time in reverse order, gives what reading every key
    at once gives, bitwise; each result is a fresh tensor (no view of a file), and no checkpoint file stays
    mapped after a read (so memory does not grow with the keys read)."""
    eager = runs.state(name)
    ckpt = runs.checkpoint(name)
    lazy = open_optimizer_state(ckpt)
    assert lazy.keys() == eager.keys() and lazy.frozen == eager.frozen and lazy.step == eager.step
    assert _mapped(ckpt) == []
    for key in reversed(lazy.keys()):
        for what in reversed(WHAT):
            (value,) = lazy.tensors(key, (what,)).values()
            assert _mapped(ckpt) == [], key
            assert torch.equal(value, getattr(eager, what)[key]), (key, what)
            assert value.untyped_storage().nbytes() == value.numel() * 4, (key, what)  # its own storage
            assert not value.requires_grad, (key, what)


def test_lora_round_trip_through_the_reshard_tool(runs, tmp_path):
    """A LoRA fine-tune (DP2 ZeRO-1, 16 adapters trained, the base frozen) -> TP2 (vocabulary re-padded,
    384 -> 512) -> back to TP1: adapters' masters and moments bitwise, frozen weights carried in weights/."""
    from tools import reshard_checkpoint

    src = runs.checkpoint("lora_z1")
    a, b = tmp_path / "tp2", tmp_path / "tp1"
    assert reshard_checkpoint.main([str(src), "--tensor", "2", "--pipeline", "1", "--out", str(a)]) == 0
    assert reshard_checkpoint.main([str(a), "--tensor", "1", "--pipeline", "1", "--out", str(b)]) == 0
    source, at_tp2, back = runs.state("lora_z1"), open_optimizer_state(a), read_optimizer_state(b)
    assert (source.padded_vocab_size, at_tp2.padded_vocab_size, back.padded_vocab_size) == (384, 512, 384)
    assert source.keys() == at_tp2.keys() == back.keys() and source.frozen == at_tp2.frozen == back.frozen
    for what in WHAT:  # adapters have no vocabulary rows: equal at every layout
        for key in source.keys():
            assert torch.equal(getattr(source, what)[key], at_tp2.tensors(key, (what,))[what]), (key, what)
        assert all(torch.equal(getattr(source, what)[k], getattr(back, what)[k]) for k in source.keys())
    cfg = source.config
    m, weights, weights_b = cfg.model, WeightReader(src), WeightReader(b)
    frozen = [lp for lp in layout.iter_layer_params(m, task=task_params(cfg)) if lp.key in source.frozen]
    assert {lp.spec.split for lp in frozen} >= {"vocab", "qkv", "gate_up", "row", "replicated"}
    for lp in frozen:
        assert torch.equal(weights.full(lp), weights_b.full(lp)), lp.key
    assert back.global_samples == source.global_samples and back.client_state == source.client_state


def test_fp16_loss_scaler_and_schedule_survive_the_tool(runs, tmp_path):
    """The layout-free state keeps what is not a tensor: fp16's dynamic loss scaler, the LR schedule,
    the counters and bigtrain's client state (DP2 ZeRO-1 fp16 -> TP2 DP1)."""
    from tools import reshard_checkpoint

    out = tmp_path / "tp2"
    argv = [str(runs.checkpoint("dp2fp16")), "--tensor", "2", "--pipeline", "1", "--data-parallel", "1"]
    assert reshard_checkpoint.main([*argv, "--out", str(out)]) == 0
    source, resharded = runs.state("dp2fp16"), open_optimizer_state(out)
    a, b = source.loss_scaler, resharded.loss_scaler
    assert b is not None and (b.cur_scale, b.cur_iter, b.dynamic) == (a.cur_scale, a.cur_iter, a.dynamic)
    for name in ("last_epoch", "_step_count", "base_lrs", "_last_lr"):
        assert resharded.lr_scheduler[name] == source.lr_scheduler[name], name
    assert (resharded.step, resharded.global_steps, resharded.global_samples, resharded.skipped_steps) == (
        source.step,
        source.global_steps,
        source.global_samples,
        source.skipped_steps,
    )
    assert resharded.client_state == source.client_state and resharded.layout["data_parallel"] == 1
    assert resharded.config.precision == "fp16" and resharded.config.derived.data_parallel_size == 1
