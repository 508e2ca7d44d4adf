"""Export parity: checkpoints trained at TP=2xPP=2 (tied), TP=1 and DP=2 ZeRO-3 are exported with
tools/convert_to_hf.py, loaded by transformers with nothing missing or new, and give the logits of
bigtrain's own model (max abs diff <= 1e-4, KL <= 1e-9) and the same 32 greedy tokens as
tools/generate.py on the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tools.conftest import SEQ, TRUE_VOCAB, last_json, tool, venv_on_path

pytestmark = pytest.mark.slow
PROMPT = [5, 9, 13, 17, 21]


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over positions, in float64."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None  # compare full-length runs
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def exports(trained, work):
    """Layout name -> (checkpoints dir, HF export dir); small shards force a multi-file export. The CLI
    for TP=2xPP=2; the other layouts call the same function in this process (saves start-up time)."""
    from tools.convert_to_hf import export

    done = {}

    def get(name: str):
        if name not in done:
            ckpt, out = trained(name), work / f"hf-{name}"
            if name == "tp2pp2":
                tool("convert_to_hf", "--checkpoint", ckpt, "--output", out, "--max-shard-size-mb", "0.1")
            else:
                export(ckpt, out, max_shard_bytes=100_000, progress=False)
            done[name] = ckpt, out
        return done[name]

    return get


@pytest.fixture(scope="module")
def native():
    """bigtrain.generation models in this process's world of one (closed at the end)."""
    from bigtrain.generation import NativeModel

    opened = {}

    def get(ckpt):
        if ckpt not in opened:
            for other in opened.values():
                other.close()
            opened.clear()
            with venv_on_path():
                opened[ckpt] = NativeModel.from_checkpoint(ckpt)
        return opened[ckpt]

    yield get
    for model in opened.values():
        model.close()


@pytest.mark.parametrize("name", ["tp2pp2", "tp1", "dp2-zero3"])
def test_export_matches_bigtrain(name, exports, native):
    from transformers import AutoModelForCausalLM

    ckpt, out = exports(name)
    tied = name == "tp2pp2"

    # the directory transformers expects: config, sharded safetensors + index, generation config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert ("lm_head.weight" in index["weight_map"]) is not tied
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == TRUE_VOCAB and config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (
        10000.0,
        1e-5,
        SEQ,
    )
    assert (out / "generation_config.json").is_file()

    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )
    assert hf.model.embed_tokens.weight.shape == (TRUE_VOCAB, 64)
    hf.eval()

    model = native(ckpt)
    tokens = torch.randint(0, TRUE_VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.logits(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (4, SEQ, TRUE_VOCAB)
    max_abs, kl = float((ours - theirs).abs().max()), kl_divergence(ours, theirs)
    print(f"{name}: max abs logit diff {max_abs:.3e}, KL {kl:.3e}")
    assert max_abs <= 1e-4 and kl <= 1e-9

    expected = hf_greedy(hf, PROMPT, 32)
    if name == "tp2pp2":  # the CLI once; the other layouts call the same function in this process
        proc = tool(
            "generate",
            "--checkpoint",
            ckpt,
            "--prompt-ids",
            ",".join(map(str, PROMPT)),
            "--greedy",
            "--ignore-eos",
            "--max-new-tokens",
            "32",
            "--json",
        )
        got = last_json(proc.stdout)["new_ids"]
    else:
        got = model.generate(PROMPT, 32, greedy=True)
    assert got == expected and len(got) == 32


def test_pipeline_files_match_layout_table(trained):
    """The stage split the importer writes (layout.stage_params) is what DeepSpeed's PipelineModule did."""
    from safetensors import safe_open

    from bigtrain.checkpoint import WeightReader
    from bigtrain.config import config_from_dict
    from bigtrain.models import layout

    reader = WeightReader(trained("tp2pp2"))
    cfg = config_from_dict(reader.meta["config"]).resolve(4)
    parts = layout.pipeline_parts(
        cfg.model, cfg.derived.padded_vocab_size, 2, 2, cfg.parallel.partition_method
    )
    for stage in range(2):
        for tp in range(2):
            with safe_open(str(reader.files[(tp, stage)]), "pt") as f:
                assert set(f.keys()) == {lp.key for lp in layout.stage_params(cfg.model, parts, stage)}
    assert "0.word_embeddings.weight" in {lp.key for lp in layout.stage_params(cfg.model, parts, 1)}  # tied


def test_inspect_checkpoint(trained):
    from tools.inspect_checkpoint import render

    ckpt = trained("tp2pp2")
    info = last_json(tool("inspect_checkpoint", ckpt, "--json").stdout)
    assert info["step"] == 3 and info["consumed_samples"] == 24 and info["consumed_tokens"] == 24 * SEQ
    assert info["layout"]["tensor"] == 2 and info["layout"]["pipeline"] == 2 and info["layout"]["data"] == 1
    assert info["model"]["vocab_size"] == TRUE_VOCAB and info["model"]["padded_vocab_size"] == 768
    by_key = {t["key"]: t for t in info["tensors"]}
    qkv = by_key["1.attention.qkv.weight"]
    assert qkv["full_shape"] == [(4 + 2 * 2) * 16, 64] and qkv["rank_shape"] == [64, 64]
    assert by_key["2.mlp.down.weight"]["full_shape"] == [64, 128] and by_key["2.mlp.down.weight"][
        "rank_shape"
    ] == [64, 64]
    assert by_key["0.word_embeddings.weight"]["full_shape"] == [768, 64]
    assert "4.weight" not in by_key and info["model"]["tie_word_embeddings"]  # tied: no output layer
    assert [f["file"] for f in info["files"]] == [
        f"tp{t:02d}_pp{p:02d}.safetensors" for t in range(2) for p in range(2)
    ]
    text = render(info)
    assert "24 samples = 768 tokens" in text and "tensor=2 pipeline=2 data=1" in text
    assert "1.attention.qkv.weight" in text and "128x64" in text
