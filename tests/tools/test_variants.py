"""The families people start from, as variants of bigtrain's decoder: Llama 3.2 (llama3 rotary
scaling), Qwen2.5 (q/k/v bias, tied embeddings), Qwen3 (q/k norm, head_dim != hidden/heads), Mistral
v0.1 (sliding window shorter than the sequence), Phi-3-mini-4k (fused qkv_proj/gate_up_proj, window)
Gemma 2 (offset norms around attention and MLP, GeGLU, scaled embeddings, soft-capping, alternating
window) and Gemma 3 1B (Gemma 2's block with q/k norm, 5 windowed blocks with their own rotary base per
full one). Each published config.json (only sizes shrunk; token
ids kept inside the shrunk vocabulary) gets random weights saved by transformers, and then:

- ``tools/convert_from_hf.py`` at TP1 -> bigtrain's logits equal transformers' within 1e-5 (fp32);
- a wrong-on-purpose bigtrain (scaling off, bias dropped, norm missing, window ignored) misses by more;
- HF -> bigtrain -> HF (``tools/convert_to_hf.py``) is bitwise: every tensor, every config.json value;
- greedy generation with bigtrain's KV cache equals transformers' ``generate`` for 32 tokens;
- one 4-process run imports all seven at TP2xPP2 and gives transformers' logits within 1e-4 (slow).
"""

from __future__ import annotations

import pytest
import torch

from tests.tools.conftest import assert_round_trip, hf_model, saved_and_imported, venv_on_path
from tests.training.helpers import torchrun

SEQ = 48  # > Mistral's shrunk window (16): the window is exercised
PROMPT = [5, 9, 13, 17, 21, 25, 29, 33]  # 8 + 32 generated > the window too
SHRUNK = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

# config.json as published on the Hub, sizes shrunk (noted per line); everything else verbatim
PUBLISHED: dict[str, dict] = {
    "llama-3.2-1b": {  # meta-llama/Llama-3.2-1B
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,  # 128000 (vocab shrunk)
        "eos_token_id": 2,  # 128001
        "head_dim": 16,  # 64
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 512,  # 131072 (lengths / 256)
        "mlp_bias": False,
        "model_type": "llama",
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 32,  # 8192 (lengths / 256)
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 500,  # 128256
    },
    "qwen2.5-0.5b": {  # Qwen/Qwen2.5-0.5B
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 3,  # 151643
        "eos_token_id": 3,  # 151643
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,  # 24 (layers shrunk)
        "model_type": "qwen2",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 500,  # 151936
    },
    "qwen3-0.6b": {  # Qwen/Qwen3-0.6B
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 3,  # 151643
        "eos_token_id": 4,  # 151645
        "head_dim": 32,  # 128 (still 2x hidden/heads)
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 40960,
        "max_window_layers": 2,  # 28
        "model_type": "qwen3",
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 500,  # 151936
    },
    "mistral-7b-v0.1": {  # mistralai/Mistral-7B-v0.1
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 512,  # 32768 (lengths / 64)
        "model_type": "mistral",
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 16,  # 4096 (lengths / 256: shorter than the sequences compared)
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 500,  # 32000
    },
    "phi-3-mini-4k": {  # microsoft/Phi-3-mini-4k-instruct
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "eos_token_id": 2,  # 32000 (vocab shrunk)
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 512,  # 4096 (lengths / 8)
        "model_type": "phi3",
        "num_key_value_heads": 4,  # 32: as many as the query heads
        "original_max_position_embeddings": 512,  # 4096
        "pad_token_id": 3,  # 32000
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": 15,  # 2047 (2^11 - 1 -> 2^4 - 1: shorter than the sequences compared)
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 500,  # 32064
    },
    "gemma-2-2b": {  # google/gemma-2-2b
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": 32,  # 256 (2x hidden/heads)
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
        "max_position_embeddings": 512,  # 8192 (lengths / 16)
        "model_type": "gemma2",
        "pad_token_id": 0,
        "query_pre_attn_scalar": 32,  # 256 (= head_dim)
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 16,  # 4096 (lengths / 256: shorter than the sequences compared)
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": 500,  # 256000
    },
    "gemma-3-1b": {  # google/gemma-3-1b-pt
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": None,
        "head_dim": 32,  # 256 (2x hidden/heads)
        "hidden_activation": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
        "max_position_embeddings": 512,  # 32768 (lengths / 64)
        "model_type": "gemma3_text",
        "num_hidden_layers": 6,  # 26: one full pattern of 5 windowed blocks and a full one
        "pad_token_id": 0,
        "query_pre_attn_scalar": 32,  # 256 (= head_dim)
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 16,  # 512 (lengths / 32: shorter than the sequences compared)
        "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 500,  # 262144 (and 2 kv heads, not 1: bigtrain's TP splits whole kv groups)
    },
}


def wrong_on_purpose(name: str, model) -> None:
    """Break, in bigtrain's model, exactly the variant this family needs."""
    from bigtrain.models.layers import Rotary

    for block in model.blocks:
        attention = block.attention
        if name.startswith("llama"):  # scaling off: plain rotary with the same theta
            attention.rotary = Rotary(attention.rotary.head_dim, attention.rotary.theta)
        elif name.startswith("qwen2"):  # bias dropped
            attention.qkv.bias = None
        elif name.startswith("qwen3"):  # q/k norm missing
            attention.qk_norm = False
        elif name.startswith("gemma-3"):  # local rotary base ignored: the windowed blocks rotate as the full
            attention.rotary = model.blocks[5].attention.rotary
        elif name.startswith("gemma"):  # norm offset missing: weight instead of 1 + weight
            for norm in (
                block.input_norm,
                block.post_attention_norm,
                block.attention_out_norm,
                block.mlp_out_norm,
            ):
                norm.offset = False
        else:  # window ignored (Mistral, Phi-3)
            attention.window = None


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (HF directory saved by transformers, the HF model, its TP1 import)."""
    configs = {name: {**SHRUNK, **published} for name, published in PUBLISHED.items()}
    return saved_and_imported(tmp_path_factory.mktemp("variants"), configs)


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_import_logits_equal_transformers_and_control_fails(name, families):
    from bigtrain.generation import NativeModel

    hf_dir, hf, ckpt = families[name]
    ids = tokens(hf.config.vocab_size)
    with venv_on_path(), NativeModel.from_checkpoint(ckpt) as model, torch.no_grad():
        assert model.cfg.model.hf_model_type == hf.config.model_type
        theirs = hf(ids).logits
        diff = float((model.logits(ids) - theirs).abs().max())
        wrong_on_purpose(name, model.model)
        control = float((model.logits(ids) - theirs).abs().max())
    print(f"{name}: TP1 max abs logits diff {diff:.2e} (wrong on purpose: {control:.2e})")
    assert diff <= 1e-5
    assert control > 1e-3  # far outside the tolerance: the comparison sees the variant


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_round_trip_is_bitwise_and_keeps_the_family(name, families, tmp_path):
    """Every tensor and every config.json value come back; transformers loads the export as the
    family's own class, with nothing missing or left over."""
    from tools.convert_to_hf import export

    hf_dir, hf, ckpt = families[name]
    assert_round_trip(hf_dir, export(ckpt, tmp_path / "hf", progress=False), hf)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_greedy_generation_with_kv_cache_equals_transformers(name, families):
    from bigtrain.generation import NativeModel

    _, hf, ckpt = families[name]
    hf.generation_config.eos_token_id = None  # compare full-length runs
    expected = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    expected = expected[0, len(PROMPT) :].tolist()
    with venv_on_path(), NativeModel.from_checkpoint(ckpt) as model:
        got = model.generate(PROMPT, 32, greedy=True)
    assert got == expected and len(got) == 32


@pytest.mark.slow
def test_tensor2_pipeline2_logits_equal_transformers(families, tmp_path):
    """One 4-process run over all seven imports at TP2xPP2 (biases split with their rows, q/k norms per
    local head, the window on every rank, tied embeddings across the stages)."""
    from tools.convert_from_hf import convert

    ids = tokens(500)
    torch.save(ids, tmp_path / "tokens.pt")
    args, expected = ["--tokens", str(tmp_path / "tokens.pt")], {}
    for name, (hf_dir, hf, _) in families.items():
        ckpt = convert(hf_dir, tmp_path / name, tensor=2, pipeline=2, progress=False)
        args += ["--checkpoint", str(ckpt), "--output", str(tmp_path / f"{name}.pt")]
        with torch.no_grad():
            expected[name] = hf(ids).logits
    torchrun(4, args, module="tests.tools.pipeline_logits_probe")
    for name, theirs in expected.items():
        diff = float((torch.load(tmp_path / f"{name}.pt") - theirs).abs().max())
        print(f"{name}: TP2xPP2 max abs logits diff {diff:.2e}")
        assert diff <= 1e-4, name


def test_qwen_sliding_window_from_max_window_layers(tmp_path):
    """Qwen2's ``use_sliding_window``: blocks from ``max_window_layers`` on use the window, the ones
    below attend to everything (HF's ``layer_types``); a model windowing every block misses."""
    from bigtrain.generation import NativeModel
    from tools.convert_from_hf import convert

    published = {
        **PUBLISHED["qwen2.5-0.5b"],
        "use_sliding_window": True,
        "sliding_window": 8,
        "max_window_layers": 1,
    }
    hf = hf_model({**SHRUNK, **published})
    assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    hf.save_pretrained(tmp_path / "hf")
    ckpt = convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    ids = tokens(hf.config.vocab_size)
    with venv_on_path(), NativeModel.from_checkpoint(ckpt) as model, torch.no_grad():
        assert [b.attention.window for b in model.model.blocks] == [None, 8]
        theirs = hf(ids).logits
        assert float((model.logits(ids) - theirs).abs().max()) <= 1e-5
        model.model.blocks[0].attention.window = 8
        assert float((model.logits(ids) - theirs).abs().max()) > 1e-3


def test_import_trains_at_a_capped_length_and_the_export_keeps_the_declared_context():
    """Llama 3.2 declares 131072 positions: the import's config trains at 4096 (IMPORT_SEQ_LENGTH) and
    keeps 131072 as model.max_position_embeddings, which is also llama3 scaling's default original
    context and what the export writes back, whatever seq_length a run then trains at."""
    from bigtrain.models import layout
    from bigtrain.models.layers import Rotary
    from tools.convert_from_hf import IMPORT_SEQ_LENGTH, bigtrain_config

    hf = {**PUBLISHED["llama-3.2-1b"], **SHRUNK, "max_position_embeddings": 131072}
    m = bigtrain_config(hf, 1, 1, "parameters").model
    assert (m.seq_length, m.max_position_embeddings, m.context_length) == (IMPORT_SEQ_LENGTH, 131072, 131072)
    m.seq_length = 64
    assert layout.hf_config_values(m)["max_position_embeddings"] == 131072
    assert Rotary.of(m).context == 131072
    short = bigtrain_config({**hf, "max_position_embeddings": 512}, 1, 1, "parameters").model
    assert (short.seq_length, layout.hf_config_values(short)["max_position_embeddings"]) == (512, 512)
