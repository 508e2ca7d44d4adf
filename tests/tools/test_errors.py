"""Bad input: each failure names its cause and leaves nothing at (or next to) the output path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.tools.conftest import HF_ARCH, tool, venv_on_path

pytestmark = pytest.mark.slow


def assert_nothing_written(out):
    assert not out.exists(), f"{out} was left behind"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary files left"


def copy_weights(ckpt, dest):
    """A step directory's weights and metadata only (what the exporter reads)."""
    tag = ckpt / (ckpt / "latest").read_text().strip()
    dest.mkdir(parents=True)
    shutil.copytree(tag / "weights", dest / "weights")
    shutil.copy2(tag / "bigtrain.json", dest / "bigtrain.json")
    return dest


def rewrite_manifest(step):
    """A manifest that agrees with the damaged files (a faulty writer, not disk corruption): the
    exporter's own consistency checks must still catch it."""
    from bigtrain.checkpoint_files import MANIFEST, write_manifest

    (step / MANIFEST).unlink(missing_ok=True)
    write_manifest(step, {}, step=0)


def test_export_refuses_checkpoint_with_missing_shard(imported, tmp_path):
    step = copy_weights(imported, tmp_path / "step_00000000")
    (step / "weights" / "tp00_pp01.safetensors").unlink()  # a whole stage of rank 0: no key points to it
    out = tmp_path / "hf"
    proc = tool("convert_to_hf", "--checkpoint", step, "--output", out, check=False)
    assert proc.returncode == 1
    assert "manifest.json is missing" in proc.stderr, proc.stderr  # an unverifiable checkpoint is refused
    rewrite_manifest(step)
    out = tmp_path / "hf"
    proc = tool("convert_to_hf", "--checkpoint", step, "--output", out, check=False)
    assert proc.returncode == 1
    assert "missing shard file(s) tp00_pp01.safetensors" in proc.stderr, proc.stderr
    assert_nothing_written(out)


def test_export_refuses_tied_copies_out_of_sync(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from tools.convert_to_hf import ExportError, export

    step = copy_weights(trained("tp2pp2"), tmp_path / "step")
    last = step / "weights" / "tp01_pp01.safetensors"
    tensors = load_file(str(last))
    tensors["0.word_embeddings.weight"] = tensors["0.word_embeddings.weight"] + 1e-3
    save_file(tensors, str(last))
    rewrite_manifest(step)
    with pytest.raises(ExportError, match="0.word_embeddings.weight differs between pipeline stages"):
        export(step, tmp_path / "hf", progress=False)
    assert_nothing_written(tmp_path / "hf")


def write_config(directory, **fields):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({**HF_ARCH, "model_type": "llama", **fields}))
    return directory


UNSUPPORTED = {
    "gpt2": ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel"),
    "gemma2-bidirectional": (
        {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "use_bidirectional_attention": True},
        "use_bidirectional_attention=true",
    ),
    "gemma3-multimodal": (
        {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]},  # multimodal
        "architecture Gemma3ForConditionalGeneration",
    ),
    "phi3-dropout": (
        {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "resid_pdrop": 0.1},
        "resid_pdrop=0.1",
    ),
    "llama-attention-bias": ({"attention_bias": True}, "attention_bias=true"),
    "dynamic-rope-scaling": (
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
        "rope scaling type 'dynamic' (dynamic NTK rescales rotary only at inference",
    ),
    "phi3-128k-longrope": (
        {
            "model_type": "phi3",
            "architectures": ["Phi3ForCausalLM"],
            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
        },
        "rope scaling type 'longrope'",
    ),
    "qwen2-layer-types": (
        {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 0,
            "layer_types": ["full_attention", "sliding_attention", "full_attention"],
        },
        "layer_types ['full_attention', 'sliding_attention', 'full_attention']",
    ),
    "gelu": ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_import_names_unsupported_architecture(case, tmp_path):
    from tools.convert_from_hf import ConversionError, convert

    fields, message = UNSUPPORTED[case]
    hf = write_config(tmp_path / "hf", **fields)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        convert(hf, tmp_path / "ckpt")
    assert_nothing_written(tmp_path / "ckpt")


def test_import_cli_unsupported_architecture(tmp_path):
    hf = write_config(tmp_path / "hf", model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"])
    out = tmp_path / "ckpt"
    proc = tool("convert_from_hf", "--hf", hf, "--output", out, check=False)
    assert proc.returncode == 2 and "architecture Gemma3ForConditionalGeneration" in proc.stderr, proc.stderr
    assert_nothing_written(out)


def test_import_cli_tensor_size_must_divide_kv_heads(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    proc = tool("convert_from_hf", "--hf", hf_dir, "--output", out, "--tensor-parallel", 4, check=False)
    assert proc.returncode == 1
    assert "model.num_kv_heads 2 is not divisible by parallel.tensor 4" in proc.stderr, proc.stderr
    assert_nothing_written(out)


def test_import_refuses_unexpected_tensors_and_busy_output(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from tools.convert_from_hf import ConversionError, convert

    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    tensors = load_file(str(hf / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ConversionError, match=r"unsupported tensor\(s\) model.layers.0.self_attn.q_proj.bias"
    ):
        convert(hf, tmp_path / "ckpt")
    assert_nothing_written(tmp_path / "ckpt")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert(hf_dir, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_mistral_without_sliding_window_imports(tmp_path):
    """A Mistral-style config with the same architecture imports and computes Mistral's logits."""
    from transformers import MistralConfig, MistralForCausalLM

    from bigtrain.generation import NativeModel
    from tools.convert_from_hf import convert

    torch.manual_seed(0)
    fields = {k: v for k, v in HF_ARCH.items() if k not in ("rope_theta",)}
    hf = MistralForCausalLM(MistralConfig(**fields, sliding_window=None, rope_theta=5000.0)).eval()
    hf.save_pretrained(tmp_path / "mistral")
    ckpt = convert(tmp_path / "mistral", tmp_path / "ckpt", progress=False)
    tokens = torch.randint(0, HF_ARCH["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with venv_on_path(), NativeModel.from_checkpoint(ckpt) as model, torch.no_grad():
        assert (model.logits(tokens) - hf(tokens).logits).abs().max() <= 1e-5


def test_export_refuses_a_corrupted_shard_naming_it(imported, tmp_path):
    tag = imported / (imported / "latest").read_text().strip()
    step = tmp_path / tag.name
    shutil.copytree(tag, step)
    shard = step / "weights" / "tp00_pp00.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    out = tmp_path / "hf"
    proc = tool("convert_to_hf", "--checkpoint", step, "--output", out, check=False)
    assert proc.returncode == 1
    assert f"{shard} fails its sha256 checksum" in proc.stderr, proc.stderr
    assert_nothing_written(out)
