"""bigtrain.planner against measurement: per-rank model+optimizer state accounted on a DP=2 run
(ZeRO 0-3), activation bytes autograd saves (checkpointing none/selective/full, fp32 and bf16), and
the layout ranking on the presets."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bigtrain import flops, planner
from bigtrain.config import load_config
from tests.conftest import REPO, cpu_env, run_cmd, run_with_port
from tests.models.test_layout import world_of_one  # noqa: F401  (fixture)

TINY = str(REPO / "configs" / "tiny.yaml")
# ~2.6M parameters: big enough that per-tensor padding and small buffers are noise, small enough
# for 4 engines x 3 steps on 2 ranks in ~20 s.
STATE_MODEL = [
    "model.hidden_size=256",
    "model.num_layers=4",
    "model.ffn_hidden_size=512",
    "train.global_batch_size=4",
    "zero.reduce_bucket_size=100000",
    "zero.allgather_bucket_size=100000",
    "zero.stage3_prefetch_bucket_size=100000",
]


def test_zero_state_prediction_matches_accounting_dp2(tmp_path):
    out = tmp_path / "state.json"

    def command(port: int) -> list[str]:
        return [
            sys.executable,
            str(REPO / "tools" / "bench_memory.py"),
            "state",
            "--config",
            TINY,
            "--set",
            *STATE_MODEL,
            "--nproc",
            "2",
            "--port",
            str(port),
            "--json",
            str(out),
        ]

    run_with_port(command, timeout=300)
    result = json.loads(out.read_text())
    stages = {int(k): v for k, v in result["stages"].items()}
    assert sorted(stages) == [0, 1, 2, 3]
    for stage, s in stages.items():
        assert len(s["accounted_mib_per_rank"]) == 2
        # measured: ZeRO 0-2 within 4e-5; ZeRO-3 under-predicts by 2.4% (0.5 MiB of 21.4 MiB)
        assert abs(s["prediction_error"]) <= (0.03 if stage == 3 else 1e-3), (stage, s)
    # ZeRO-0 holds fp32 params + grads + two Adam moments: 16 bytes per parameter, on both ranks.
    assert stages[0]["bytes_per_parameter"] == pytest.approx(16.0, rel=1e-3)  # measured 16.0002
    # each stage shards more; fp32 masters share the parameter partition (compat.share_fp32_master_partitions), so at DP=2
    # ZeRO-1/2 hold 4 + 4/2 + 8/2 = 10 bytes per parameter, not DeepSpeed's 12
    assert stages[1]["bytes_per_parameter"] == pytest.approx(10.0, rel=1e-3)  # measured 10.0004
    assert (
        stages[3]["bytes_per_parameter"]
        < stages[2]["bytes_per_parameter"]
        <= stages[1]["bytes_per_parameter"]
    )
    assert result["zero3_over_zero0"] < 0.6


def _saved_bytes(cfg, dtype: torch.dtype) -> int:
    from bigtrain.memory import saved_activation_bytes
    from bigtrain.registry import build_model

    model = build_model(cfg).to(dtype)
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    return saved_activation_bytes(model, lambda: model(tokens, tokens, torch.ones(b, s)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_prediction_matches_saved_tensors(world_of_one, precision):  # noqa: F811
    from bigtrain.distributed import init_distributed

    base = [
        "model.hidden_size=96",
        "model.num_attention_heads=6",
        "model.num_kv_heads=2",
        "model.ffn_hidden_size=160",
        "model.seq_length=48",
        "model.num_layers=3",
        "train.micro_batch_size=3",
        "train.global_batch_size=3",
        f"precision={precision}",
    ]
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    measured = {}
    for mode in planner.CHECKPOINTING:
        cfg = load_config(TINY, [*base, f"activation_checkpointing={mode}"]).resolve(1)
        if mode == "none":
            init_distributed(cfg)
        measured[mode] = _saved_bytes(cfg, dtype)
        layout = planner.Layout(micro_batch=3, checkpointing=mode)
        predicted, _ = planner.activation_memory(cfg, layout)
        # measured: fp32 within 6.4e-6, bf16 within 3.1e-3 (bf16 over-predicts by 0.31% without recompute)
        rel = 1e-4 if precision == "fp32" else 5e-3
        assert predicted == pytest.approx(measured[mode], rel=rel), (mode, predicted, measured[mode])
    assert measured["full"] < measured["selective"] < measured["none"]


def test_state_memory_terms_follow_zero_theory():
    """bf16 on 8 GPUs: the terms DeepSpeed's optimizers hold (see planner docstring)."""
    cfg = load_config(REPO / "configs" / "llama-1.3b.yaml").resolve(8)
    p = planner.stage_parameters(cfg.model, cfg.derived.padded_vocab_size, 1, 1)
    z1 = planner.state_memory(cfg, planner.Layout(data=8, zero=1))
    assert z1.parameters == 2 * p and z1.gradients == 4 * p and z1.optimizer == pytest.approx(12 * p / 8)
    z0 = planner.state_memory(cfg, planner.Layout(data=8, zero=0))
    assert z0.states == z1.states  # bigtrain runs bf16 ZeRO-0 as ZeRO-1
    z3 = planner.state_memory(cfg, planner.Layout(data=8, zero=3))
    assert z3.states < planner.state_memory(cfg, planner.Layout(data=8, zero=2)).states < z1.states
    off = planner.state_memory(cfg, planner.Layout(data=8, zero=2, offload=True))
    assert off.optimizer == 0 and off.cpu_offloaded > 0
    # pipeline stages split the parameters; tensor parallelism splits all but the norms
    assert planner.stage_parameters(cfg.model, cfg.derived.padded_vocab_size, 1, 4) < p / 3.5
    assert planner.stage_parameters(cfg.model, cfg.derived.padded_vocab_size, 2, 1) == pytest.approx(
        p / 2, rel=0.01
    )


def test_plan_ranks_fitting_layouts_first():
    cfg = load_config(REPO / "configs" / "llama-13b.yaml")
    ranked = planner.plan(cfg, gpus=8, gpu_memory_gib=80)
    best = ranked[0]
    assert best.fits and best.why
    usable = 80 * planner.GIB * (1 - planner.ALLOCATOR_MARGIN) - planner.GPU_OVERHEAD_BYTES
    assert best.memory.total <= usable
    # 13B with 16 bytes/parameter of state does not fit one 80 GB GPU unsharded
    unsharded = [c for c in ranked if c.layout.tensor == c.layout.pipeline == 1 and c.layout.zero == 0]
    assert unsharded and not any(c.fits for c in unsharded)
    fitting = [c for c in ranked if c.fits]
    # by predicted throughput, the demoted offload layouts (planner.rank) in a block of their own at the end
    demoted = [c.demoted for c in fitting]
    assert demoted == sorted(demoted)
    for group in ([c for c in fitting if not c.demoted], [c for c in fitting if c.demoted]):
        assert all(a.tokens_per_sec_per_gpu >= b.tokens_per_sec_per_gpu for a, b in zip(group, group[1:]))
    # fewer GPU memory: the plan falls back to recomputation or more sharding, never to an unfit layout
    small = planner.plan(cfg, gpus=8, gpu_memory_gib=40)[0]
    assert small.fits and small.memory.total < best.memory.total


def test_plan_cli_prints_choice_and_settings(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_cmd(
        [
            sys.executable,
            str(REPO / "tools" / "plan.py"),
            "--config",
            str(REPO / "configs" / "llama-1.3b.yaml"),
            "--gpus",
            "8",
            "--gpu-memory-gib",
            "80",
            "--json",
            str(out),
        ],
        env=cpu_env(),
        timeout=120,
    )
    assert "choice: TP" in proc.stdout and "settings: --set parallel.tensor=" in proc.stdout
    rows = json.loads(out.read_text())
    assert rows[0]["fits"] and rows[0]["memory_gib"]["total"] < 80
    assert {"parameters", "gradients", "optimizer", "activations"} <= set(rows[0]["memory_gib"])


def test_reduce_bucket_capped_at_the_shard_and_reduction_dtype_reach_deepspeed():
    """DeepSpeed allocates ZeRO-3's gradient bucket whole: the default 500M elements would be 2 GB of fp32
    for a 0.2M-parameter model. bigtrain hands it at most one rank's shard; a smaller setting is kept."""
    from bigtrain.engine import deepspeed_config

    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        cfg = load_config(TINY, [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", "zero.stage=1"]).resolve(
            tp * pp
        )
        shard = planner.stage_parameters(cfg.model, cfg.derived.padded_vocab_size, tp, pp)
        assert deepspeed_config(cfg)["zero_optimization"]["reduce_bucket_size"] == shard < 500_000_000
    cfg = load_config(TINY, ["zero.stage=3", "zero.reduce_bucket_size=1000"]).resolve(2)
    assert deepspeed_config(cfg)["zero_optimization"]["reduce_bucket_size"] == 1000
    assert planner.state_memory(cfg, planner.Layout(tensor=1, pipeline=1, data=2, zero=3)).buffers == 4 * 1000
    bf16 = load_config(TINY, ["precision=bf16", "zero.stage=3", "zero.reduce_bucket_size=1000"]).resolve(2)
    zero3 = planner.Layout(tensor=1, pipeline=1, data=2, zero=3)
    assert (
        planner.state_memory(bf16, zero3).buffers == 4 * 1000
    )  # DeepSpeed allocates it in fp32 (the reduction dtype)
    # the gradient reduction dtype: fp32 by default under bf16, the training precision on request
    assert "communication_data_type" not in deepspeed_config(cfg)  # fp32 training reduces in fp32
    bf16 = load_config(TINY, ["precision=bf16"]).resolve(2)
    assert deepspeed_config(bf16)["communication_data_type"] == "fp32"
    model = load_config(TINY, ["precision=bf16", "zero.grad_reduce_dtype=model"]).resolve(2)
    assert deepspeed_config(model)["communication_data_type"] == "bf16"


@pytest.mark.parametrize("reduce_dtype,itemsize", [("fp32", 4), ("model", 2)])
def test_zero3_bucket_prediction_matches_deepspeeds_allocation(world_of_one, reduce_dtype, itemsize):  # noqa: F811
    """bf16 ZeRO-3: DeepSpeed allocates its gradient bucket whole, in the reduction's dtype (fp32 by
    default), capped by bigtrain at the model's size; the planner predicts exactly that buffer."""
    from bigtrain.distributed import init_distributed
    from bigtrain.engine import initialize_engine
    from bigtrain.registry import build_model

    cfg = load_config(TINY, ["precision=bf16", "zero.stage=3", f"zero.grad_reduce_dtype={reduce_dtype}"])
    cfg = cfg.resolve(1)
    dist = init_distributed(cfg)
    engine = initialize_engine(cfg, build_model(cfg, topology=dist.topology), dist)
    buffers = [b.buffer for b in engine.optimizer.ipg_buckets.values()]
    assert [t.element_size() for t in buffers] == [itemsize]
    allocated = sum(t.numel() * t.element_size() for t in buffers)
    predicted = planner.state_memory(cfg, planner.Layout(tensor=1, pipeline=1, data=1, zero=3)).buffers
    assert allocated == predicted == itemsize * planner.reduce_bucket_elements(cfg, 1, 1)


def test_offload_terms_follow_their_formulas():
    """Host-link bytes and CPU Adam time per step, by hand for 1.3B bf16 (2-byte parameters)."""
    cfg = load_config(REPO / "configs" / "llama-1.3b.yaml").resolve(8)
    hw = planner.Hardware(host_link_gbps=20.0, host_cores_per_gpu=4, cpu_adam_params_per_s_per_core=1e8)
    assert hw.cpu_adam_params_per_s == 4e8  # under the memory-bandwidth cap
    capped = planner.Hardware(host_memory_gbps=28.0, host_cores_per_gpu=1000)
    assert capped.cpu_adam_params_per_s == pytest.approx(28e9 / planner.CPU_ADAM_BYTES)
    p = 800_000_000
    accum = cfg.train.global_batch_size // (2 * 8)
    part = p / 8
    cases = {
        1: 4 + 2,  # fp32 gradient partition out, bf16 parameters back
        2: 4 + 2 + (2 * accum - 1) * 2,  # + per-micro-batch accumulation through the host
        3: (2 * accum - 1) * 2 + 2,  # the gradient partition buffer lives on the host
    }
    for zero, per_element in cases.items():
        layout = planner.Layout(data=8, zero=zero, micro_batch=2, offload=True)
        pcie, adam = planner.offload_time(cfg, layout, hw, p)
        assert pcie == pytest.approx(part * per_element / 20e9)
        assert adam == pytest.approx(part / 4e8)
    one = planner.Layout(data=8, zero=2, micro_batch=cfg.train.global_batch_size // 8, offload=True)
    assert planner.offload_time(cfg, one, hw, p)[0] == pytest.approx(part * 6 / 20e9)  # accum 1
    # step_time shows both terms and adds them to the total; without offload they are zero
    layout = planner.Layout(data=8, zero=2, micro_batch=2, offload=True)
    s = planner.step_time(cfg, layout, hw)
    pcie, adam = planner.offload_time(
        cfg, layout, hw, planner.stage_parameters(cfg.model, cfg.derived.padded_vocab_size, 1, 1)
    )
    assert s["offload_pcie"] == pytest.approx(pcie) and s["offload_adam"] == pytest.approx(adam)
    s0 = planner.step_time(cfg, planner.Layout(data=8, zero=2, micro_batch=2), hw)
    assert s0["offload_pcie"] == s0["offload_adam"] == 0
    assert s["total"] - s0["total"] == pytest.approx(pcie + adam)
    parts = ("compute", "tensor_comm", "bubble", "data_comm_exposed", "zero3_overhead")
    assert s0["total"] == pytest.approx(sum(s0[k] for k in parts))


def test_7b_plan_prices_offload():
    """7B on 8 x 80 GB (global batch 1024 x 4096 tokens, so 64 micro-batches per step at DP8 mbs2):
    ZeRO-2/3 offload moves gradients through the host every micro-batch and is predicted far slower;
    ZeRO-1 offload pays its host copies and CPU Adam once per step, a few tenths of a second out of
    ~42 s, so the model puts it within 1-2 % of the best no-offload layouts. Issue 14's acceptance: the
    plan no longer ranks an offload layout beside (or between) no-offload layouts that fit: every fitting
    offload layout comes after every fitting no-offload one, marked demoted, its numbers unchanged."""
    cfg = load_config(REPO / "configs" / "llama-7b.yaml")
    ranked = [c for c in planner.plan(cfg, gpus=8, gpu_memory_gib=80) if c.fits]
    plain = [i for i, c in enumerate(ranked) if not c.layout.offload]
    offload = [i for i, c in enumerate(ranked) if c.layout.offload]
    assert plain and offload
    assert max(plain) < min(offload)  # no offload layout among or between the no-offload ones
    assert plain == list(range(len(plain)))
    assert all(ranked[i].demoted and "offload demoted" in ranked[i].why for i in offload)
    assert not any(ranked[i].demoted for i in plain)
    best = ranked[0]
    assert "offload layouts ranked after the no-offload ones" in best.why
    # the demotion is the policy's, not the model's: the best ZeRO-1 offload layout is predicted within
    # the 10 % margin of the best no-offload one, and the shown throughput is step_time's
    zero1 = next(c for c in ranked if c.layout.offload and c.layout.zero == 1)
    assert best.tokens_per_sec_per_gpu < zero1.tokens_per_sec_per_gpu * 1.10
    c1 = planner.layout_config(cfg, zero1.layout)
    tokens = c1.train.global_batch_size * c1.model.seq_length
    assert zero1.tokens_per_sec_per_gpu == pytest.approx(tokens / zero1.seconds["total"] / 8)
    for c in ranked:
        if c.layout.offload and c.layout.zero >= 2:
            assert c.seconds["total"] > 1.15 * best.seconds["total"], c.layout.describe()
        if c.layout.offload:
            assert c.seconds["offload_pcie"] > 0 and c.seconds["offload_adam"] > 0
            twin = [d for d in ranked if d.layout == planner.replace(c.layout, offload=False)]
            if twin:
                assert twin[0].seconds["total"] < c.seconds["total"]
    zero2 = next(c for c in ranked if c.layout.offload and c.layout.zero == 2 and c.layout.data == 8)
    assert zero2.seconds["offload_pcie"] > 10 * zero2.seconds["offload_adam"]


def test_offload_ranks_by_throughput_when_nothing_fits_without_it():
    """1.3B on one 16 GiB GPU: 18 bytes/parameter of unsharded bf16 state (~25 GB) fit only with the
    optimizer on the host, so offload layouts are ranked normally and the first is the choice."""
    cfg = load_config(REPO / "configs" / "llama-1.3b.yaml")
    ranked = planner.plan(cfg, gpus=1, gpu_memory_gib=16)
    fitting = [c for c in ranked if c.fits]
    assert fitting and all(c.layout.offload for c in fitting)
    assert ranked[0] is fitting[0] and not any(c.demoted for c in ranked)
    assert all(a.tokens_per_sec_per_gpu >= b.tokens_per_sec_per_gpu for a, b in zip(fitting, fitting[1:]))
    assert "nothing fits without it" in ranked[0].why


def _candidate(tokens_per_sec: float, offload: bool, fits: bool = True, data: int = 1) -> planner.Candidate:
    layout = planner.Layout(data=data, zero=1, offload=offload)
    return planner.Candidate(layout, planner.MemoryEstimate(), fits, {}, tokens_per_sec, 0.5)


def test_offload_margin_keeps_a_clearly_faster_offload_layout_first():
    """rank(): an offload layout predicted more than the margin faster than the best fitting no-offload
    layout keeps its place; within the margin it goes after every fitting no-offload layout; layouts
    that do not fit stay last whatever their speed."""
    plain_best, plain_other = _candidate(1000.0, False), _candidate(900.0, False, data=2)
    fast = _candidate(1150.0, True)  # +15 %
    close = _candidate(1050.0, True, data=2)  # +5 %
    huge = _candidate(5000.0, False, fits=False, data=4)
    ranked = planner.rank([close, huge, plain_other, fast, plain_best])
    assert ranked == [fast, plain_best, plain_other, close, huge]
    assert not fast.demoted and close.demoted and "by more than 10%" in close.why
    # a margin over 15 % demotes both; margin 0 ranks purely by throughput
    assert planner.rank([fast, plain_best, close], offload_margin=0.2) == [plain_best, fast, close]
    assert planner.rank([close, plain_best, fast], offload_margin=0.0) == [fast, close, plain_best]
    with pytest.raises(ValueError, match="offload_margin"):
        planner.rank([fast], offload_margin=-0.1)


def test_cpu_adam_default_matches_a_measurement_here():
    """DeepSpeedCPUAdam over 16M fp32 parameters, fastest of 5 steps (~5 s with the op built, ~1 min
    the first time it compiles). The 25 % check applies to DeepSpeed's op only: the AdamW fallback
    (no C++ toolchain) is a different optimizer, so only its rate being positive is checked."""
    rate, backend = planner.measure_cpu_adam()
    assert rate > 0
    if backend == "deepspeed-cpu-adam":
        assert rate == pytest.approx(planner.CPU_ADAM_PARAMS_PER_S_PER_CORE, rel=0.25)


def test_plan_cli_explain_prints_every_term(capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import plan as plan_tool

    plan_tool.main(
        ["--config", str(REPO / "configs" / "llama-7b.yaml"), "--gpus", "8", "--gpu-memory-gib", "80"]
        + ["--only", "offload=true", "zero=2", "--top", "1", "--explain"]
    )
    out = capsys.readouterr().out
    for term in ("compute", "tensor-parallel comm", "pipeline bubble", "data-parallel comm exposed"):
        assert term in out
    for term in ("ZeRO-3 overhead", "offload host link (PCIe)", "offload CPU Adam", "total"):
        assert term in out
    # the 7B ZeRO-2 offload layouts are demoted: the row is marked and the breakdown says why
    assert "57% *" not in out and " *\n" in out and "offload demoted: predicted" in out
    assert "payload per rank per step (GB): data all reduce" in out


def test_plan_cli_only_filters_and_explains_the_filtered_choice(capsys):
    """--only keeps matching layouts and the choice line explains the first of them (a demoted offload
    layout says why it is demoted); unknown fields, mistyped values, a malformed filter and an --explain
    rank outside the list exit 2 naming what is wrong."""
    sys.path.insert(0, str(REPO / "tools"))
    import plan as plan_tool

    base = ["--config", str(REPO / "configs" / "llama-7b.yaml"), "--gpus", "8", "--gpu-memory-gib", "80"]
    assert plan_tool.main([*base, "--only", "tensor=2", "zero=1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    choice = next(line for line in out.splitlines() if line.startswith("choice: "))
    assert (
        choice.startswith(("choice: TP2 ", "choice: TP2+SP ")) and "ZeRO-1 " in choice and "GiB of" in choice
    ), choice
    assert plan_tool.main([*base, "--only", "offload=true", "--top", "1"]) == 0
    choice = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("choice: "))
    assert "+offload" in choice and "GiB of" in choice and "offload demoted" in choice, choice
    for args, needle in (
        (["--only", "tp=2"], "--only tp: not a layout field (one of tensor, pipeline"),
        (["--only", "offload=yes"], "--only offload=yes: expected true or false"),
        (["--only", "zero"], "--only zero: expected FIELD=VALUE"),
        (["--explain", "100000"], "--explain 100000: the list has ranks 1-"),
    ):
        assert plan_tool.main([*base, *args]) == 2, args
        assert needle in capsys.readouterr().err, args


# ---------------------------------------------------------------------------- the bert family
BERT_PRESETS = ("bert-tiny", "bert-base", "bert-large")


@pytest.mark.parametrize("name", BERT_PRESETS)
def test_bert_presets_load_and_validate(name):
    """Every bert preset loads and resolves through the config's own validation, on its world size,
    with the masking defaults (Devlin et al.: 15 %, 80/10/10, NSP)."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    cfg.resolve(1 if name == "bert-tiny" else 8)
    m = cfg.model
    assert (m.family, m.hf_model_type, m.activation, m.tie_embeddings) == ("bert", "bert", "gelu", True)
    assert m.ffn_size == 4 * m.hidden_size and m.context_length == m.seq_length
    masking = cfg.data.masking
    assert (masking.prob, masking.mask_fraction, masking.random_fraction) == (0.15, 0.8, 0.1)
    assert masking.sentence_pair == "nsp"
    if name != "bert-tiny":
        assert cfg.precision == "bf16" and cfg.train.global_batch_size == 256
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (1e-4, 10000, 0.01)


def test_bert_block_activations_match_hf_bert_layer():
    """One post-LN encoder block, fp32: the bytes autograd saves in HF's BertLayer (SDPA, dropout 0, the
    padding mask passed as a [b, 1, 1, s] additive bias) equal block_activation_bytes less the one term
    HF does not have: the copy of SDPA's output into the out projection's input, which bigtrain's
    [s, b, h] activations make (as the decoder's measured block does) and HF's [b, s, h] ones do not."""
    from transformers.models.bert.modeling_bert import BertLayer

    from bigtrain.memory import saved_activation_bytes
    from tests.test_flops import hf_bert_config

    cfg = load_config(
        REPO / "configs" / "bert-tiny.yaml",
        [
            "model.hidden_size=96",
            "model.num_attention_heads=6",
            "model.ffn_hidden_size=160",
            "model.seq_length=48",
        ],
    ).resolve(1)
    m = cfg.model
    b, s, h = 3, m.seq_length, m.hidden_size
    hf = hf_bert_config(
        m, m.vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    layer = BertLayer(hf).train()
    x = torch.randn(b, s, h, requires_grad=True)
    bias = torch.zeros(b, 1, 1, s)
    bias[0, ..., 40:] = torch.finfo(torch.float32).min  # the first sequence is padded
    measured = saved_activation_bytes(layer, lambda: layer(x, attention_mask=bias).sum())
    tokens = b * s
    predicted = planner.block_activation_bytes(m, tokens, 4, 1, "none")
    assert predicted - tokens * 4 * h == measured
    # full recomputation keeps the block input only
    assert planner.block_activation_bytes(m, tokens, 4, 1, "full") == x.numel() * 4


def test_bert_plans_for_base_and_large():
    """bert-base and bert-large on 8 x 80 GB: the states come from the encoder's parameter count, the preset
    layouts fit (bert-large's is the one the planner ranks first), and the TP all-reduces and DP reduction
    follow the decoder's rules."""
    for name in ("bert-base", "bert-large"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        ranked = planner.plan(cfg, gpus=8, gpu_memory_gib=80)
        assert ranked[0].fits and ranked[0].why
        mine = planner.Layout(
            data=8,
            zero=cfg.zero.stage,
            micro_batch=cfg.train.micro_batch_size,
            checkpointing=cfg.activation_checkpointing,
        )
        chosen = next(c for c in ranked if c.layout == mine)
        assert chosen.fits, (name, chosen.memory.as_dict())
        if name == "bert-large":
            assert ranked[0].layout == mine
        resolved = cfg.resolve(8)
        m, padded = resolved.model, resolved.derived.padded_vocab_size
        p = planner.stage_parameters(m, padded, 1, 1)
        assert p == flops.num_parameters(m, padded)
        state = planner.state_memory(resolved, mine)
        assert state.parameters == 2 * p and state.optimizer == pytest.approx(12 * p / 8)
        # no rotary tables: activations are the embedding, the blocks and the MLM/NSP heads
        tokens = mine.micro_batch * m.seq_length
        saved, _ = planner.activation_memory(resolved, mine)
        assert saved == pytest.approx(
            planner.embedding_activation_bytes(m, tokens, 2)
            + m.num_layers * planner.block_activation_bytes(m, tokens, 2, 1, "none")
            + planner.output_activation_bytes(m, tokens, 2, m.vocab_size, 1)
        )
    tp = planner.Layout(tensor=2, data=4, zero=1, micro_batch=8)
    volume = planner.comm_bytes(planner.layout_config(cfg, tp), tp)
    accum, t = 256 // (8 * 4), 8 * m.seq_length
    assert volume["tensor_all_reduce"] == accum * ((4 * m.num_layers + 2) * t * m.hidden_size * 2 + 3 * t * 4)
    p2 = planner.stage_parameters(m, planner.padded_vocab_size(m, 2), 2, 1)
    assert volume["data_all_reduce"] == p2 * planner.reduce_bytes(cfg) and p2 < p / 1.9
    # pipeline p2p per step: [t, h] bf16 activations forward and gradients back, + the bool padding mask
    pp = planner.Layout(pipeline=4, data=2, zero=1, micro_batch=8)
    accum = 256 // (8 * 2)
    assert planner.pipeline_p2p_bytes(planner.layout_config(cfg, pp), pp) == accum * (
        2 * t * m.hidden_size * 2 + t
    )
    assert planner.pipeline_p2p_bytes(cfg, tp) == 0
    # PP2: the last stage holds the tied embedding again, with at least the last block and the heads
    layers = flops.layer_parameters(m, padded, 1)
    assert planner.stage_parameters(m, padded, 1, 2) >= layers[0] + layers[-2] + layers[-1]


def test_plan_cli_ranks_bert_large(capsys):
    """tools/plan.py on bert-large: a ranked list of fitting layouts, the choice and its settings; --explain
    on a PP2 layout shows the pipeline's point-to-point payload."""
    import re

    from tools import plan

    args = ["--config", str(REPO / "configs" / "bert-large.yaml"), "--gpus", "8", "--gpu-memory-gib", "80"]
    rc = plan.main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (
        "bert, 336M parameters, 24 layers, h=1024, seq 512" in out
        and "choice: TP1 PP1 DP8 ZeRO-2 mbs32 ckpt=none" in out
    )
    assert "settings: --set parallel.tensor=1 parallel.pipeline=1 zero.stage=2" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 10 and all(" yes " in row for row in rows)
    assert plan.main([*args, "--only", "pipeline=2", "--explain"]) == 0
    p2p = re.search(r"pipeline p2p ([0-9.e+-]+)", capsys.readouterr().out)
    assert p2p and float(p2p.group(1)) > 0  # a PP2 layout sends activations and gradients


# ---------------------------------------------------------------------------- sequence / context parallel
# 12 blocks of h=128 over a 256-token vocabulary: the blocks outweigh the logits, so what SP/CP split shows
LONG = [
    "model.hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_size=256",
    "model.seq_length=64",
    "model.num_layers=12",
    "model.vocab_size=256",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
]
SPLIT_RUNS = {
    "dp2": [],  # every rank holds the whole model and sequence: one process's activations
    "tp2": ["parallel.tensor=2"],
    "tp2_sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    "tp2_full": ["parallel.tensor=2", "activation_checkpointing=full"],
    "tp2_sp_full": ["parallel.tensor=2", "parallel.sequence_parallel=true", "activation_checkpointing=full"],
    "cp2": ["parallel.context=2"],
    "cp2_selective": ["parallel.context=2", "activation_checkpointing=selective"],
    "cp2_full": ["parallel.context=2", "activation_checkpointing=full"],
    "tp2_sp_bf16": ["parallel.tensor=2", "parallel.sequence_parallel=true", "precision=bf16"],
    "cp2_bf16": ["parallel.context=2", "precision=bf16"],
}


@pytest.fixture(scope="module")
def split_activations():
    """{run: [saved bytes on rank 0, rank 1]} from one 2-process gloo launch
    (tools/bench_activation_memory.py: its ``--worker`` ranks)."""
    from tools.bench_activation_memory import measure

    return measure({name: [*LONG, *extra] for name, extra in SPLIT_RUNS.items()}, TINY, 400, env=cpu_env())


@pytest.mark.parametrize("name", list(SPLIT_RUNS))
def test_split_activation_prediction_matches_saved_tensors_per_rank(split_activations, name):
    """Per rank, fp32, 2 x 64 tokens: what autograd saves at DP2 (one process's share), TP2, TP2+SP and
    CP2 (Ulysses), without recomputation, selective (CP2) and full, equals activation_memory's prediction
    for the heaviest rank (measured: within 8 bytes, the scalar loss and its sum; the issue asks for
    5 %). Under CP the ranks differ by the cached fp32 rotary tables only: each builds them up to the end
    of its chunk, so context rank 0 holds half of them (8 KiB less here; bf16 saves copies of its own rows
    only). bf16: TP2+SP 4,281,348 and CP2 4,181,512 bytes per rank, predicted 0.38 % / 0.39 % over (the
    single-process bf16 test above: 0.31 %)."""
    cfg = load_config(TINY, [*LONG, *SPLIT_RUNS[name]]).resolve(2)
    predicted, _ = planner.activation_memory(cfg, planner.Layout.of(cfg))
    rel = 5e-3 if cfg.precision == "bf16" else 1e-4  # bf16: as the single-process test above
    assert predicted == pytest.approx(max(split_activations[name]), rel=rel), (name, predicted)
    cached = name.startswith("cp2") and cfg.activation_checkpointing != "full" and cfg.precision == "fp32"
    tables = 8 * cfg.model.seq_length * cfg.model.head_dim // 2 if cached else 0
    assert max(split_activations[name]) - min(split_activations[name]) == tables, split_activations[name]


def test_sequence_and_context_parallel_split_activations_where_the_paper_says(split_activations):
    """Issue 18 acceptance 3. Measured bytes per rank (the heavier rank):
    DP2 (one process) 14,539,784; TP2 9,743,620; TP2+SP 7,279,620; CP2 7,278,088;
    full recomputation: TP2 1,051,908; TP2+SP 560,132; CP2 558,600.

    SP splits only what lies outside the tensor-parallel regions (the norms; Korthikanti et al. 2022's
    ``10 + 24/t`` -> ``34/t``), and CP2 against TP2 only adds the same split (both already halve attention
    and MLP), so without recomputation TP2 -> TP2+SP and TP2 -> CP2 save 1.34x here (Megatron's own bound
    at t=2 is 22/17 = 1.29x: the >= 1.8x the issue asks for is out of reach there by construction). Under
    full recomputation, where each block keeps only its input, both are 1.88x; against one process, TP2+SP
    and CP2 are 2.0x without recomputation."""
    m = {name: max(v) for name, v in split_activations.items()}
    for split in ("tp2_sp", "cp2"):
        assert m["tp2_full"] / m[f"{split}_full"] >= 1.8, split
        assert m["dp2"] / m[split] >= 1.8, split
        assert 1.25 < m["tp2"] / m[split] < 1.45, split
        assert m[split] < m["tp2"] < m["dp2"]
    assert m["cp2_full"] < m["cp2_selective"] < m["cp2"]


# ---------------------------------------------------------------------------- long-context presets
LONG_PRESETS = {"llama-8b-32k": (8, 32768), "llama-8b-128k": (64, 131072)}


@pytest.mark.parametrize("name", list(LONG_PRESETS))
def test_long_context_presets_validate_and_fit_80gb(name):
    """The Llama-3-8B long-context presets: the model's shape (8.0B parameters, GQA 32/8, rope theta
    500000, 128,256 tokens), validated on their world size with sequence and context parallelism, and
    predicted to fit an 80 GB GPU in the layout they set (the planner's activation, state and transient
    terms; measured per rank on CPU above)."""
    gpus, seq = LONG_PRESETS[name]
    cfg = load_config(REPO / "configs" / f"{name}.yaml").resolve(gpus)
    m, p = cfg.model, cfg.parallel
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.kv_heads, m.ffn_size) == (
        4096,
        32,
        32,
        8,
        14336,
    )
    assert (m.vocab_size, m.rope_theta, m.seq_length, m.tie_embeddings) == (128256, 500000.0, seq, False)
    assert flops.num_parameters(m, m.vocab_size) == pytest.approx(8.03e9, rel=0.01)
    assert p.sequence_parallel and p.context > 1 and p.tensor * p.context <= m.kv_heads
    layout = planner.Layout.of(cfg)
    assert layout.gpus == gpus
    base = load_config(REPO / "configs" / f"{name}.yaml")
    cand = planner.evaluate(base, layout, 80 * planner.GIB, planner.Hardware())
    assert cand.fits, cand.memory.as_dict()
    # predicted: 32k 51.0 GiB (99.0 without recomputation; 70.2 as TP2 x DP4 without SP and CP), 128k
    # 43.7 GiB (140.7 without recomputation; 104.1 as TP4 x DP16, which does not fit); the saved
    # activations without SP and CP (their ranks as data ranks) are 2.7x (32k) and 4.2x (128k) larger
    bare = planner.replace(layout, checkpointing="none")
    assert not planner.evaluate(base, bare, 80 * planner.GIB, planner.Hardware()).fits
    plain = planner.replace(layout, context=1, data=layout.data * layout.context, sequence_parallel=False)
    ratio = planner.activation_memory(cfg, plain)[0] / cand.memory.activations
    assert ratio > 2.5, ratio
    if name == "llama-8b-128k":
        assert not planner.evaluate(base, plain, 80 * planner.GIB, planner.Hardware()).fits


def test_plan_recommends_context_parallelism_at_128k(capsys):
    """tools/plan.py on the 128k preset over 8 nodes of 8 x 80 GB: the choice splits the sequence over
    context ranks and says why (the best layout without it, and how much slower it is predicted), and the
    settings carry parallel.context."""
    from tools import plan

    args = ["--config", str(REPO / "configs" / "llama-8b-128k.yaml"), "--gpus", "64", "--nodes", "8"]
    assert plan.main([*args, "--gpu-memory-gib", "80", "--top", "5"]) == 0
    out = capsys.readouterr().out
    choice = next(line for line in out.splitlines() if line.startswith("choice: "))
    assert " CP" in choice.split(":")[1] and "context parallelism CP" in choice, choice
    assert "the best layout without it (TP" in choice and "slower" in choice, choice
    settings = next(line for line in out.splitlines() if line.startswith("settings: "))
    context = int(settings.split("parallel.context=")[1].split()[0])
    assert context > 1
    assert (
        plan.main(
            [*args, "--gpu-memory-gib", "80", "--only", "context=1", "sequence_parallel=true", "--top", "1"]
        )
        == 0
    )
    choice = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("choice: "))
    assert choice.startswith("choice: TP") and "+SP PP" in choice and "context parallelism" not in choice


def test_plan_chooses_context_parallelism_when_nothing_fits_without_it():
    """A 1M-token sequence of the 7B model (32 key/value heads) on 64 x 80 GB: no layout without context
    parallelism fits (tensor parallelism stops at a node), so the choice uses it and says so."""
    cfg = load_config(
        REPO / "configs" / "llama-7b.yaml", ["model.seq_length=1048576", "train.global_batch_size=4"]
    )
    ranked = planner.plan(cfg, gpus=64, gpu_memory_gib=80, nodes=8)
    assert not any(c.fits for c in ranked if c.layout.context == 1)
    best = ranked[0]
    assert best.fits and best.layout.context > 1
    assert f"context parallelism CP{best.layout.context} because no layout without it fits" in best.why


def test_zero_shards_over_data_and_context():
    """ZeRO partitions optimizer state (and ZeRO-2's gradients) over data x context ranks, as Megatron and
    bigtrain's DeepSpeed MPU do: CP2 x DP2 holds what DP4 holds; activations fall with CP."""
    cfg = load_config(REPO / "configs" / "llama-8b-32k.yaml").resolve(8)
    cp = planner.Layout(tensor=2, data=2, zero=2, checkpointing="full", sequence_parallel=True, context=2)
    dp = planner.replace(cp, data=4, context=1)
    assert cp.shards == dp.shards == 4 and cp.gpus == 8
    assert planner.state_memory(cfg, cp) == planner.state_memory(cfg, dp)
    acts = {
        n: planner.activation_memory(cfg, planner.replace(cp, context=n, data=4 // n))[0] for n in (1, 2, 4)
    }
    assert acts[1] / acts[2] == pytest.approx(2, rel=0.02) and acts[2] / acts[4] == pytest.approx(2, rel=0.02)


# ---------------------------------------------------------------------------- mixture of experts
MOE_TINY = str(REPO / "configs" / "moe-tiny.yaml")


def test_moe_presets_load_and_count_like_the_published_models():
    """Mixtral-8x7B's shapes give its published 46.7B parameters, 12.9B active; the 8x1B preset ~1B
    active; both validate on their layouts (64 and 8 GPUs) and the planner fits them in 80 GB."""
    mixtral = load_config(REPO / "configs" / "mixtral-8x7b.yaml").resolve(64)
    m, v = mixtral.model, mixtral.derived.padded_vocab_size
    assert round(flops.num_parameters(m, 32000) / 1e9, 1) == 46.7
    assert round(flops.active_parameters(m, 32000) / 1e9, 1) == 12.9
    small = load_config(REPO / "configs" / "moe-8x1b.yaml").resolve(8)
    assert 0.9e9 < flops.active_parameters(small.model, small.model.vocab_size) < 1.1e9
    for cfg in (mixtral, small):
        layout = planner.Layout.of(cfg)
        budget = 80 * planner.GIB * (1 - planner.ALLOCATOR_MARGIN) - planner.GPU_OVERHEAD_BYTES
        assert planner.estimate(cfg, layout).total < budget, layout.describe()
    assert planner.Layout.of(mixtral).expert == 4 and v == 32000


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_expert_state_per_rank_by_hand(world_of_one, ep):  # noqa: F811
    """fp32 ZeRO-1 at DP4: each rank holds the dense parameters and num_experts/ep experts (counted on
    bigtrain's model); Adam's 8 bytes per parameter are split over the 4 data ranks for the dense ones
    and over the data/ep ranks holding the same experts for the expert ones."""
    from bigtrain.distributed import init_distributed
    from bigtrain.registry import build_model

    cfg = load_config(MOE_TINY, ["zero.stage=1"]).resolve(1)
    init_distributed(cfg)
    named = dict(build_model(cfg).named_parameters())
    experts = sum(p.numel() for n, p in named.items() if ".mlp.experts." in n)
    dense = sum(p.numel() for p in named.values()) - experts
    assert experts == flops.expert_parameters(cfg.model)
    layout = planner.Layout(data=4, zero=1, expert=ep)
    est = planner.state_memory(cfg, layout)
    assert est.parameters == 4 * (dense + experts // ep)
    assert est.gradients == pytest.approx(4 * (dense / 4 + experts / ep / (4 / ep)), rel=1e-12)
    assert est.optimizer == pytest.approx(8 * (dense / 4 + experts / ep / (4 / ep)), rel=1e-12)


def test_expert_all_to_all_volume_by_hand():
    """Per MoE block and micro-batch: dispatch and combine of t*top_k rows of h, forward and backward
    (full recomputation: forward again); t is the router's tokens (seq/tp under sequence parallelism);
    nothing at EP1; the wire carries (ep-1)/ep of it."""
    cfg = load_config(MOE_TINY).resolve(4)  # 2 MoE blocks, h 64, seq 32, top-2, fp32, global batch 8
    volume = planner.comm_bytes(cfg, planner.Layout(data=4, micro_batch=2, expert=2))
    accum, t = 8 // (2 * 4), 2 * 32
    assert volume["expert_all_to_all"] == accum * 2 * 4 * t * 2 * 64 * 4
    full = planner.comm_bytes(cfg, planner.Layout(data=4, micro_batch=2, expert=2, checkpointing="full"))
    assert full["expert_all_to_all"] == 1.5 * volume["expert_all_to_all"]
    sp = load_config(MOE_TINY, ["parallel.tensor=2", "parallel.sequence_parallel=true"]).resolve(4)
    tp2 = planner.comm_bytes(
        sp, planner.Layout(tensor=2, data=2, micro_batch=2, expert=2, sequence_parallel=True)
    )
    assert tp2["expert_all_to_all"] == (8 // (2 * 2)) * 2 * 4 * (t // 2) * 2 * 64 * 4
    assert planner.comm_bytes(cfg, planner.Layout(data=4, micro_batch=2))["expert_all_to_all"] == 0
    dense = load_config(TINY).resolve(4)
    assert "expert_all_to_all" not in planner.comm_bytes(dense, planner.Layout(data=4))
    assert planner.wire_factor("expert_all_to_all", 2) == 0.5
