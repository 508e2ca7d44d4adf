"""Mixtures of experts both ways with Hugging Face: ``MixtralForCausalLM`` (every block sparse, top-k
renormalized) and ``Qwen2MoeForCausalLM`` (gated shared expert, q/k/v biases, no renormalization; also with
``decoder_sparse_step`` 2: dense MLPs between the sparse blocks). Each published config.json (sizes shrunk)
gets random weights saved by transformers, and then:

- ``tools/convert_from_hf.py`` at TP1 -> bigtrain's logits equal transformers' within 1e-5; the experts
  permuted in bigtrain's model miss by far (the comparison sees the expert mapping);
- HF -> bigtrain -> HF is bitwise: every tensor, every config.json value;
- greedy generation with bigtrain's KV cache (one-token steps through the router and the dispatcher)
  equals transformers' ``generate``, and the router in eval mode records no aux loss;
- checkpoints trained by ``bigtrain.pretrain`` export to both classes: logits within 1e-4, and
  ``tools/generate.py`` on the checkpoint and on the export give the same greedy tokens;
- imports at TP2 (sequence parallel) and PP2 give transformers' logits (slow: one 2-process run each);
- what bigtrain cannot express is refused, naming the key (OLMoE's all-head q/k norm included).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.tools.conftest import assert_round_trip, saved_and_imported, tool, venv_on_path
from tests.training.helpers import single, torchrun, train_args, write_corpus

SEQ = 48
PROMPT = [5, 9, 13, 17, 21, 25, 29, 33]
SHRUNK = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=500
)

PUBLISHED: dict[str, dict] = {
    "mixtral-8x7b": {  # mistralai/Mixtral-8x7B-v0.1
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "intermediate_size": 96,  # 14336
        "max_position_embeddings": 512,  # 32768 (lengths / 64)
        "model_type": "mixtral",
        "num_experts_per_tok": 2,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    },
    "qwen1.5-moe-a2.7b": {  # Qwen/Qwen1.5-MoE-A2.7B
        "architectures": ["Qwen2MoeForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 3,  # 151643 (vocab shrunk)
        "decoder_sparse_step": 1,
        "eos_token_id": 3,  # 151643
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "intermediate_size": 160,  # 5632
        "max_position_embeddings": 8192,
        "max_window_layers": 2,  # 21 (layers shrunk)
        "model_type": "qwen2_moe",
        "moe_intermediate_size": 40,  # 1408
        "norm_topk_prob": False,
        "num_experts": 6,  # 60
        "num_experts_per_tok": 4,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 160,  # 5632
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
    },
}
# Mixtral with a window shorter than the sequences compared (Mistral's rule: every block)
PUBLISHED["mixtral-window"] = {**PUBLISHED["mixtral-8x7b"], "sliding_window": 16}
# Qwen2-MoE with dense MLPs between the sparse blocks (model.moe.layer_freq 2: blocks 1 and 3 sparse)
PUBLISHED["qwen2-moe-step2"] = {
    **PUBLISHED["qwen1.5-moe-a2.7b"],
    "decoder_sparse_step": 2,
    "num_hidden_layers": 4,
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (HF directory saved by transformers, the HF model, its TP1 import)."""
    configs = {name: {**SHRUNK, **published} for name, published in PUBLISHED.items()}
    return saved_and_imported(tmp_path_factory.mktemp("moe-hf"), configs)


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


def permute_experts(model) -> int:
    """Wrong on purpose: every MoE block's experts rolled by one (router rows kept). Returns the blocks."""
    from bigtrain.models.moe import MoE

    moes = [block.mlp for block in model.blocks if isinstance(block.mlp, MoE)]
    with torch.no_grad():
        for moe in moes:
            moe.experts.gate_up.copy_(moe.experts.gate_up.roll(1, dims=0))
            moe.experts.down.copy_(moe.experts.down.roll(1, dims=0))
    return len(moes)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_import_logits_equal_transformers_and_permuted_experts_fail(name, families):
    from bigtrain.generation import NativeModel
    from bigtrain.models.llama import SwiGLU

    hf_dir, hf, ckpt = families[name]
    ids = tokens(hf.config.vocab_size)
    with venv_on_path(), NativeModel.from_checkpoint(ckpt) as model, torch.no_grad():
        m = model.cfg.model
        assert m.hf_model_type == hf.config.model_type
        sparse = [i for i in range(m.num_layers) if m.moe.is_moe_block(i)]
        dense = [i for i, block in enumerate(model.model.blocks) if isinstance(block.mlp, SwiGLU)]
        assert sparse == ([1, 3] if name == "qwen2-moe-step2" else list(range(m.num_layers)))
        assert dense == sorted(set(range(m.num_layers)) - set(sparse))
        window = getattr(hf.config, "sliding_window", None) if name.startswith("mixtral") else None
        assert [block.attention.window for block in model.model.blocks] == [window] * m.num_layers
        theirs = hf(ids).logits
        diff = float((model.logits(ids) - theirs).abs().max())
        assert permute_experts(model.model) == len(sparse)
        control = float((model.logits(ids) - theirs).abs().max())
    print(f"{name}: TP1 max abs logits diff {diff:.2e} (experts permuted: {control:.2e})")
    assert diff <= 1e-5
    assert control > 1e-3


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_round_trip_is_bitwise_and_keeps_the_family(name, families, tmp_path):
    from tools.convert_to_hf import export

    hf_dir, hf, ckpt = families[name]
    original = assert_round_trip(hf_dir, export(ckpt, tmp_path / "hf", progress=False), hf)
    experts = getattr(hf.config, "num_local_experts", None) or hf.config.num_experts
    assert sum(f".experts.{experts - 1}." in k for k in original) > 0  # the last expert is in the files


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_greedy_generation_with_kv_cache_equals_transformers_and_records_no_aux_loss(name, families):
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from bigtrain.generation import NativeModel

    _, hf, ckpt = families[name]
    hf.generation_config.eos_token_id = None  # compare full-length runs
    expected = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    expected = expected[0, len(PROMPT) :].tolist()

    def recorded() -> float:
        tracker = get_moe_layer_wise_logging_tracker()
        return sum(float(entry["values"].abs().sum()) for entry in tracker.values())

    # megatron's tracker is global, sized by the first model that records: start this model's afresh
    get_moe_layer_wise_logging_tracker().clear()
    with venv_on_path(), NativeModel.from_checkpoint(ckpt) as model:
        got = model.generate(PROMPT, 32, greedy=True)
        assert recorded() == 0  # eval mode: the router computes no aux loss
        model.model.train()  # the control: a training forward records it
        model.model.outputs(torch.tensor([PROMPT]))
        assert recorded() > 0
    get_moe_layer_wise_logging_tracker().clear()
    assert got == expected and len(got) == 32


TRAINED = {  # hf_model_type -> overrides of configs/tiny.yaml
    # a capacity no expert can exceed (2 x the tokens): nothing dropped, but the export warns
    "mixtral": [
        "model.hf_model_type=mixtral",
        "model.moe.ffn_hidden_size=48",
        "model.moe.capacity_factor=4.0",
    ],
    "qwen2_moe": [
        "model.hf_model_type=qwen2_moe",
        "model.qkv_bias=true",
        "model.num_layers=4",
        "model.moe.layer_freq=2",
        "model.moe.ffn_hidden_size=32",
        "model.moe.norm_topk_prob=false",
        "model.moe.shared_expert_ffn_size=80",
        "model.moe.shared_expert_gate=true",
    ],
}


@pytest.mark.parametrize("kind", sorted(TRAINED))
def test_trained_checkpoint_exports_with_equal_logits_and_generations(kind, tmp_path, capsys):
    """3 steps of ``bigtrain.pretrain`` (aux and z-loss on), then the export: transformers' logits within
    1e-4 of bigtrain's, and ``tools/generate.py`` greedy on the checkpoint equals it on the export."""
    from transformers import AutoModelForCausalLM

    from bigtrain.generation import NativeModel
    from tools.convert_to_hf import export

    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    moe = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.z_loss_coeff=0.001"]
    single(train_args(corpus, tmp_path / "run", *moe, *TRAINED[kind], steps=3))
    ckpt = tmp_path / "run" / "checkpoints"
    out = export(ckpt, tmp_path / "hf", progress=False)
    warned = "routes every token (dropless)" in capsys.readouterr().err
    assert warned == (kind == "mixtral")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.model_type == kind
    ids = tokens(hf.config.vocab_size)
    with venv_on_path(), NativeModel.from_checkpoint(ckpt) as model, torch.no_grad():
        diff = float((model.logits(ids) - hf(ids).logits).abs().max())
    print(f"{kind}: trained checkpoint vs its export, max abs logits diff {diff:.2e}")
    assert diff <= 1e-4
    common = ["--prompt-ids", ",".join(map(str, PROMPT)), "--greedy", "--max-new-tokens", "24"]
    common += ["--ignore-eos", "--json"]
    ours = json.loads(tool("generate", "--checkpoint", ckpt, *common).stdout.strip().splitlines()[-1])
    theirs = json.loads(tool("generate", "--hf", out, *common).stdout.strip().splitlines()[-1])
    assert ours["new_ids"] == theirs["new_ids"] and len(ours["new_ids"]) == 24


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "tensor", "pipeline"), [("TP2", 2, 1), ("PP2", 1, 2)])
def test_parallel_import_logits_equal_transformers(layout, tensor, pipeline, families, tmp_path):
    """One 2-process run over the three imports at one layout: TP2 (sequence parallel, as megatron's MoE
    layer needs: experts split by their rows / columns, the router and shared-expert gate whole on each
    rank), PP2 (stages cut by DeepSpeed's partitioner from the table's per-block parameter counts, which
    differ between dense and sparse blocks)."""
    from bigtrain.checkpoint import WeightReader
    from tools.convert_from_hf import convert

    ids = tokens(500)
    torch.save(ids, tmp_path / "tokens.pt")
    args, expected = ["--tokens", str(tmp_path / "tokens.pt")], {}
    for name, (hf_dir, hf, _) in families.items():
        ckpt = convert(hf_dir, tmp_path / name, tensor=tensor, pipeline=pipeline, progress=False)
        assert WeightReader(ckpt).meta["config"]["parallel"]["sequence_parallel"] is (tensor > 1)
        args += ["--checkpoint", str(ckpt), "--output", str(tmp_path / f"{name}.pt")]
        with torch.no_grad():
            expected[name] = hf(ids).logits
    torchrun(2, args, module="tests.tools.pipeline_logits_probe")
    for name, theirs in expected.items():
        diff = float((torch.load(tmp_path / f"{name}.pt") - theirs).abs().max())
        print(f"{name}: {layout} max abs logits diff {diff:.2e}")
        assert diff <= 1e-4, name


# ---------------------------------------------------------------------------- refusals
def write_config(directory, config: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


REFUSED = {  # name -> (config.json changes, the words the refusal names)
    "router-jitter": ("mixtral-8x7b", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    "qwen-window": ("qwen1.5-moe-a2.7b", {"use_sliding_window": True}, "use_sliding_window=true"),
    "mlp-only-sparse": (
        "qwen2-moe-step2",
        {"mlp_only_layers": [0, 1]},
        "mlp_only_layers=[0, 1] makes sparse block(s) [1] dense",
    ),
    "no-experts": ("qwen1.5-moe-a2.7b", {"num_experts": 0}, "num_experts=0"),
    "no-shared-expert": (
        "qwen1.5-moe-a2.7b",
        {"shared_expert_intermediate_size": 0},
        "shared_expert_intermediate_size=0",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_import_refuses_what_bigtrain_cannot_express(case, tmp_path):
    from tools.convert_from_hf import UnsupportedModel, read_hf_config

    base, changes, words = REFUSED[case]
    hf_dir = write_config(tmp_path / case, {**SHRUNK, **PUBLISHED[base], **changes})
    with pytest.raises(UnsupportedModel, match="config.json: cannot import") as err:
        read_hf_config(hf_dir)
    assert words in str(err.value)


def test_mlp_only_layers_already_dense_are_accepted(tmp_path):
    """``mlp_only_layers`` naming blocks that decoder_sparse_step leaves dense anyway changes nothing."""
    from tools.convert_from_hf import bigtrain_config, read_hf_config

    hf = read_hf_config(
        write_config(tmp_path / "hf", {**SHRUNK, **PUBLISHED["qwen2-moe-step2"], "mlp_only_layers": [0, 2]})
    )
    m = bigtrain_config(hf, 1, 1, "parameters").model
    assert [m.moe.is_moe_block(i) for i in range(4)] == [False, True, False, True]


def test_olmoe_is_refused_because_its_qk_norm_spans_all_heads(tmp_path):
    """OLMoE normalizes the whole q (and k) projection with one RMS statistic: not bigtrain's per-head
    qk_norm. The CLI exits 2 naming it, and nothing is written."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        **{**SHRUNK, "num_hidden_layers": 1}, intermediate_size=32, num_experts=4, num_experts_per_tok=2
    )
    model = OlmoeForCausalLM(config)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (4 * 16,)  # heads * head_dim, not head_dim
    model.save_pretrained(tmp_path / "olmoe")
    out = tmp_path / "ckpt"
    proc = tool("convert_from_hf", "--hf", tmp_path / "olmoe", "--output", out, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "OlmoeForCausalLM" in proc.stderr and "whole query/key projection" in proc.stderr
    assert not out.exists()


def test_export_refuses_experts_under_a_dense_model_type(tmp_path):
    """A MoE checkpoint labelled llama has no HF class to go to: refused, naming the fix."""
    from tools.convert_to_hf import ExportError, export

    corpus = write_corpus(tmp_path / "corpus" / "patterns")
    moe = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=32"]
    single(train_args(corpus, tmp_path / "run", *moe, steps=1))
    with pytest.raises(ExportError, match="model.hf_model_type 'llama', whose HF class has no experts"):
        export(tmp_path / "run" / "checkpoints", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    ("kind", "moe", "words"),
    [
        ("mixtral", {"num_experts": 0}, "model.hf_model_type mixtral needs model.moe.num_experts > 0"),
        ("mixtral", {"num_experts": 4, "layer_freq": 2}, "every block is sparse"),
        ("mixtral", {"num_experts": 4, "norm_topk_prob": False}, "renormalizes the top-k"),
        ("mixtral", {"num_experts": 4, "shared_expert_ffn_size": 8}, "mixtral has no shared expert"),
        ("qwen2_moe", {"num_experts": 4, "shared_expert_ffn_size": 8}, "a gated shared expert"),
        ("qwen2_moe", {"num_experts": 0}, "qwen2_moe needs model.moe.num_experts > 0"),
    ],
)
def test_config_refuses_experts_the_hf_class_does_not_have(kind, moe, words):
    from bigtrain.config import ConfigError, config_from_dict

    tree = {
        "model": {"num_layers": 2, "vocab_size": 64, "hf_model_type": kind, "moe": moe},
        "data": {"mock": True},
    }
    with pytest.raises(ConfigError, match=words):
        config_from_dict(tree).resolve(1)


def test_config_accepts_qwen2_moe_biases_and_refuses_its_window():
    from bigtrain.config import ConfigError, config_from_dict

    moe = {"num_experts": 4, "shared_expert_ffn_size": 8, "shared_expert_gate": True}
    model = {"num_layers": 2, "vocab_size": 64, "hf_model_type": "qwen2_moe", "qkv_bias": True, "moe": moe}
    assert config_from_dict({"model": model, "data": {"mock": True}}).resolve(1).model.qkv_bias
    with pytest.raises(ConfigError, match="HF's qwen2_moe windows other blocks"):
        config_from_dict({"model": {**model, "sliding_window": 8}, "data": {"mock": True}}).resolve(1)
