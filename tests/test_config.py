"""Config tree: loading, overrides, unknown keys, derived values, and one-line layout errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bigtrain.config import ConfigError, config_from_dict, load_config
from tests.conftest import REPO, cpu_env, run_cmd
from tests.entry_point import START_UP_REACHED

TINY = REPO / "configs" / "tiny.yaml"


def test_overrides_types_and_derived_values():
    cfg = load_config(
        TINY, ["parallel.tensor=2", "train.global_batch_size=16", "optim.lr=1", "model.vocab_size=300"]
    )
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    cfg.resolve(world_size=8)
    assert cfg.derived.data_parallel_size == 4
    assert cfg.derived.grad_accum_steps == 16 // (2 * 4)
    assert cfg.derived.padded_vocab_size == 512  # multiple of 128 * tensor(2)


def test_unknown_key_and_wrong_type_name_the_field():
    with pytest.raises(ConfigError, match=r"unknown config key model\.hidden_sise"):
        load_config(TINY, ["model.hidden_sise=3"])
    with pytest.raises(
        ConfigError, match=r"train\.steps: expected int \(an integer like 1000 or 1e5\), got 'many'"
    ):
        load_config(TINY, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"--set"):
        load_config(TINY, ["nokeyvalue"])


def test_saved_config_round_trips():
    cfg = load_config(TINY, ["model.tie_embeddings=true"]).resolve(2)
    again = config_from_dict(cfg.to_dict()).resolve(2)
    assert again == cfg


@pytest.mark.parametrize(
    "world, overrides, message",
    [
        (3, ["parallel.tensor=2"], "world size 3 is not divisible by parallel.tensor*parallel.pipeline"),
        (
            4,
            ["parallel.tensor=4", "model.num_kv_heads=2"],
            "model.num_kv_heads 2 is not divisible by parallel.tensor 4",
        ),
        (8, ["parallel.tensor=8"], "model.num_attention_heads 4 is not divisible by parallel.tensor 8"),
        (4, ["parallel.pipeline=4"], "model.num_layers 2 is fewer than parallel.pipeline 4 stages"),
        (
            2,
            ["train.global_batch_size=6", "train.micro_batch_size=2"],
            "train.global_batch_size 6 is not divisible",
        ),
        (
            2,
            ["parallel.pipeline=2", "zero.stage=2"],
            "zero.stage 2 cannot be combined with parallel.pipeline 2",
        ),
        (
            2,
            ["parallel.pipeline=2", "zero.stage=3"],
            "zero.stage 3 cannot be combined with parallel.pipeline 2",
        ),
    ],
)
def test_layout_errors_exit_fast_with_one_line(world, overrides, message):
    """Each config error: exit 2, one line, before any process group exists (tests/entry_point.py)."""
    env = cpu_env(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0")
    proc = run_cmd(
        [sys.executable, "-m", "tests.entry_point", "--no-start-up", "bigtrain.pretrain"]
        + ["--config", str(TINY), "--set", *overrides],
        timeout=120,  # a hang guard, not a speed bound
        check=False,
        env=env,
    )
    assert proc.returncode == 2 and START_UP_REACHED not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("bigtrain: config error")]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_presets_validate_on_their_layout_and_have_expected_sizes():
    """Presets build by parameter count on 8 GPUs (no weights needed)."""
    from bigtrain.flops import matmul_params

    expected = {
        "llama-125m": (0.10e9, 0.17e9),
        "llama-1.3b": (1.2e9, 1.5e9),
        "llama-7b": (6.3e9, 7.0e9),
        "llama-13b": (12.5e9, 13.5e9),
    }
    for name, (lo, hi) in expected.items():
        cfg = load_config(REPO / "configs" / f"{name}.yaml").resolve(world_size=8)
        m = cfg.model
        # matmul_params includes the output layer; an untied input embedding comes on top.
        params = matmul_params(m, m.vocab_size) + (0 if m.tie_embeddings else m.vocab_size * m.hidden_size)
        assert lo <= params <= hi, (name, params)
        assert cfg.derived.grad_accum_steps >= 1


def test_help_config_lists_documented_keys():
    proc = run_cmd([sys.executable, "-m", "bigtrain.pretrain", "--help-config"], timeout=60)
    assert "parallel.tensor = 1    # Tensor-parallel size" in proc.stdout
    assert all("#" in line for line in proc.stdout.strip().splitlines())


def test_config_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def config_error(override: str) -> str:
    """The one-line ConfigError of tiny.yaml with ``override``, loaded and validated for one process."""
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override]).resolve(1)
    return str(err.value)


def test_numbers_as_people_write_them(tmp_path: Path):
    """PyYAML (YAML 1.1) reads 3e-4, 1e5 and 1E-3 as strings; numeric fields take them, from a file and
    from --set, and a value that is no number names the field and shows an accepted form."""
    path = tmp_path / "numbers.yaml"
    path.write_text(
        "optim:\n  lr: 3e-4\n  eps: 1E-8\n  min_lr: 1e-5\ntrain:\n  steps: 1e5\n  max_minutes: 90\n"
        "model:\n  rope_theta: 5e5\ndata:\n  train_samples: 2.5e6\n"
    )
    cfg = load_config(
        path, ["optim.weight_decay=1e-2", "train.global_batch_size=1.6e1", "fp16.min_loss_scale=1"]
    )
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.min_lr) == (3e-4, 1e-8, 1e-5)
    assert cfg.train.steps == 100_000 and type(cfg.train.steps) is int
    assert cfg.data.train_samples == 2_500_000 and type(cfg.data.train_samples) is int
    assert cfg.model.rope_theta == 5e5 and type(cfg.train.max_minutes) is float
    assert cfg.optim.weight_decay == 0.01 and cfg.train.global_batch_size == 16
    assert load_config(TINY, ["train.steps=1.5e2"]).train.steps == 150  # integral: accepted
    assert type(cfg.fp16.min_loss_scale) is float
    cases = {
        "optim.lr=abc": "optim.lr: expected float (a number like 3e-4, 0.0003 or 1e5), got 'abc'",
        "optim.lr=3e-4x": "optim.lr: expected float (a number like 3e-4, 0.0003 or 1e5), got '3e-4x'",
        "optim.beta2=true": "optim.beta2: expected float (a number like 3e-4, 0.0003 or 1e5), got True",
        "train.steps=2.5": "train.steps: expected int (an integer like 1000 or 1e5), got 2.5",
        "train.steps=2.5e0": "train.steps: expected int (an integer like 1000 or 1e5), got '2.5e0'",
        "data.train_samples=lots": "data.train_samples: expected null or int (an integer like 1000 or 1e5), got 'lots'",
    }
    for override, message in cases.items():
        assert config_error(override) == message
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 3e_4\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected float \(a number like 3e-4"):
        load_config(bad)


def test_values_no_run_can_use_are_refused_before_start_up():
    """A non-finite number in any numeric field (an infinite LR trained NaN weights and exited 0), an
    integer beyond 64 bits (1e100 steps spun in megatron's index build), and optimizer settings that
    torch refuses only after start-up or that train nothing: one line naming the field."""
    cases = {
        "optim.lr=.inf": "optim.lr: expected a finite float (a number like 3e-4, 0.0003 or 1e5), got inf",
        "optim.lr=.nan": "optim.lr: expected a finite float (a number like 3e-4, 0.0003 or 1e5), got nan",
        "train.max_minutes=-.inf": "train.max_minutes: expected a finite float",
        "train.steps=1e100": "train.steps: 1e+100 does not fit a 64-bit integer",
        "optim.lr=-1e-3": "optim.lr must be > 0, got -0.001",
        "optim.lr=0": "optim.lr must be > 0, got 0.0",
        "optim.min_lr=1e-2": "optim.min_lr must be >= 0 and <= optim.lr (0.001), got 0.01",
        "optim.beta2=1": "optim.beta2 must be in [0, 1), got 1.0",
        "optim.eps=0": "optim.eps must be > 0, got 0.0",
        "optim.weight_decay=-0.1": "optim.weight_decay must be >= 0, got -0.1",
        "optim.grad_clip=-1": "optim.grad_clip must be >= 0 (0 disables clipping), got -1.0",
    }
    for override, message in cases.items():
        assert config_error(override).startswith(message), (override, config_error(override))
    # a constant schedule never reaches min_lr: a larger one is harmless there
    load_config(TINY, ["optim.min_lr=1e-2", "optim.decay=constant"]).resolve(1)


def test_sequence_parallel_refusals_name_the_field():
    """Sequence parallelism runs llama pretraining and SFT at any TP/PP/DP/ZeRO layout; what it does not
    run (TP 1, a sequence that does not split evenly, bert, classification, LoRA, the control without
    SP) is one line naming the field, before any process group."""
    sp = ["parallel.tensor=2", "parallel.sequence_parallel=true"]
    sft = ["finetune.task=sft", "finetune.train=t.jsonl", "data.tokenizer=tok"]
    load_config(TINY, sp).resolve(2)
    load_config(TINY, [*sp, "parallel.pipeline=2"]).resolve(4)
    load_config(TINY, [*sp, *sft]).resolve(2)
    cases = {
        "parallel.tensor=1": "parallel.sequence_parallel needs parallel.tensor > 1",
        "model.seq_length=33": "model.seq_length 33 must be divisible by parallel.tensor 2",
        "finetune.task=classify": "llama pretraining and SFT (model.family llama, finetune.task classify)",
        "finetune.lora.rank=4": "parallel.sequence_parallel cannot be combined with finetune.lora.rank 4",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config(TINY, [*sp, *sft, "finetune.labels=[a,b]", override]).resolve(2)
        assert message in str(err.value), (override, str(err.value))
    bert = REPO / "configs" / "bert-tiny.yaml"
    with pytest.raises(
        ConfigError, match=r"llama pretraining and SFT \(model\.family bert, finetune\.task none\)"
    ):
        load_config(bert, sp).resolve(2)
    with pytest.raises(ConfigError, match=r"debug\.skip_norm_grad_reduce needs parallel\.sequence_parallel"):
        load_config(TINY, ["parallel.tensor=2", "debug.skip_norm_grad_reduce=true"]).resolve(2)


def test_top1_routing_needs_the_probability_as_weight():
    """megatron-core's router refuses top-1 after renormalization (it raised only after start-up)."""
    moe = REPO / "configs" / "moe-tiny.yaml"
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k 1 needs model\.moe\.norm_topk_prob false"):
        load_config(moe, ["model.moe.top_k=1"]).resolve(1)
    top1 = ["model.moe.top_k=1", "model.moe.norm_topk_prob=false", "model.hf_model_type=llama"]
    assert load_config(moe, top1).resolve(1).model.moe.top_k == 1


def test_expert_rank_control_needs_expert_parallelism():
    moe = REPO / "configs" / "moe-tiny.yaml"
    with pytest.raises(ConfigError, match=r"debug\.rotate_expert_ranks needs parallel\.expert > 1"):
        load_config(moe, ["debug.rotate_expert_ranks=true"]).resolve(2)
    assert (
        load_config(moe, ["debug.rotate_expert_ranks=true", "parallel.expert=2"]).resolve(2).parallel.expert
        == 2
    )
