"""Import parity and round trip: a transformers-built LlamaForCausalLM (GQA, untied, vocab 400, rope
theta 5000, eps 1e-6) imported at TP=2xPP=2 evaluates (bigtrain.evaluate, 4 processes) to the HF
model's loss on the same windows; exported back it is bitwise the original; a bf16 export loads and
generates in transformers, and its tokenizer encodes like bigtrain's."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import sentencepiece
import torch

from tests.tools.conftest import HF_ARCH, MIXED_TEXT, SEQ, last_json, random_llama, tool
from tests.training.helpers import torchrun

pytestmark = pytest.mark.slow


def write_tokens(prefix, vocab: int, documents: int = 12, seed: int = 3) -> np.ndarray:
    """A megatron indexed dataset of random documents; returns all its tokens in order."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    docs = [rng.integers(0, vocab, rng.integers(20, 90)).astype(np.uint16) for _ in range(documents)]
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return np.concatenate(docs).astype(np.int64)


def hf_window_loss(model, tokens: np.ndarray, seq: int) -> float:
    """Mean next-token loss over non-overlapping seq+1 windows in order (bigtrain.evaluate's definition)."""
    n = len(tokens) // (seq + 1)
    windows = torch.from_numpy(tokens[: n * (seq + 1)]).view(n, seq + 1)
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits.double()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    return float(losses.mean(dim=1).mean())


def byte_fallback_text(pieces: list[str]) -> str:
    """What the exported tokenizer.json's decoder (Replace "▁" -> " ", ByteFallback, Fuse) makes of
    sentencepiece pieces: a run of ``<0xNN>`` pieces is its bytes if they are valid UTF-8, else one
    U+FFFD per byte."""
    out: list[str] = []
    run: list[int] = []
    for piece in [*pieces, ""]:  # "" flushes the last run
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            run.append(int(piece[3:5], 16))
            continue
        if run:
            try:
                out.append(bytes(run).decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run.clear()
        out.append(piece.replace("\u2581", " "))
    return "".join(out)


def test_import_evaluates_to_hf_loss(imported, hf_dir, work):
    from transformers import AutoModelForCausalLM

    prefix = work / "eval-tokens" / "random"
    prefix.parent.mkdir(exist_ok=True)
    tokens = write_tokens(prefix, HF_ARCH["vocab_size"])
    proc = torchrun(
        4, ["--config", str(imported / "config.yaml"), "--data", str(prefix)], module="bigtrain.evaluate"
    )
    ours = last_json(proc.stdout)
    assert ours["windows"] == len(tokens) // (SEQ + 1)

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    theirs = hf_window_loss(hf, tokens, SEQ)
    rel = abs(ours["loss"] - theirs) / theirs
    print(f"import TP2xPP2: bigtrain loss {ours['loss']:.8f}, HF {theirs:.8f}, relative diff {rel:.2e}")
    assert rel <= 1e-5
    # the tolerance is meaningful: the same weights with the default rope theta are far off
    wrong = random_llama(rope_theta=10000.0)
    wrong.load_state_dict(hf.state_dict())
    assert abs(hf_window_loss(wrong, tokens, SEQ) - theirs) / theirs > 1e-3
    assert abs(theirs - math.log(HF_ARCH["vocab_size"])) > 0.5  # sharp predictions, not uniform


def test_imported_checkpoint_layout(imported, hf_dir):
    from bigtrain.config import load_config

    tag = imported / (imported / "latest").read_text().strip()
    assert sorted(p.name for p in (tag / "weights").iterdir()) == [
        f"tp{t:02d}_pp{p:02d}.safetensors" for t in range(2) for p in range(2)
    ]
    meta = json.loads((tag / "bigtrain.json").read_text())
    assert meta["step"] == 0 and meta["layout"] == {"tensor": 2, "pipeline": 2}
    cfg = load_config(imported / "config.yaml")
    m = cfg.model
    assert (m.vocab_size, m.num_kv_heads, m.ffn_hidden_size, m.rope_theta, m.norm_eps) == (
        400,
        2,
        96,
        5000.0,
        1e-6,
    )
    assert not m.tie_embeddings and cfg.checkpoint.load == str(imported)
    assert (tag / "tokenizer" / "tokenizer.model").is_file() and cfg.data.tokenizer == str(tag / "tokenizer")
    from tools.inspect_checkpoint import describe

    info = describe(imported)
    assert info["source"] == str(hf_dir) and info["model"]["padded_vocab_size"] == 512


@pytest.fixture(scope="module")
def round_trip(imported, work):
    out = work / "hf-round-trip"
    tool("convert_to_hf", "--checkpoint", imported, "--output", out)
    return out


def read_all(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_round_trip_is_bitwise(round_trip, hf_dir):
    original, back = read_all(hf_dir), read_all(round_trip)
    assert set(original) == set(back)
    differing = [
        k for k in original if original[k].dtype != back[k].dtype or not torch.equal(original[k], back[k])
    ]
    assert not differing, differing
    a, b = (json.loads((d / "config.json").read_text()) for d in (hf_dir, round_trip))
    # transformers 5 writes rope_theta inside rope_parameters (compared below)
    fields = [k for k in HF_ARCH if k != "rope_theta"]
    fields += ["head_dim", "hidden_act", "initializer_range", "attention_bias", "mlp_bias", "model_type"]
    assert {k: a.get(k) for k in fields} == {k: b.get(k) for k in fields}
    assert a["rope_parameters"] == b["rope_parameters"]


def test_generate_native_equals_transformers_on_text(imported, round_trip):
    """Text in, text out: the bigtrain tokenizer + model (--checkpoint) and the export (--hf) agree."""
    args = ["--prompt", "def main", "--greedy", "--max-new-tokens", "16", "--ignore-eos", "--json"]
    ours = last_json(tool("generate", "--checkpoint", imported, *args).stdout)
    theirs = last_json(tool("generate", "--hf", round_trip, *args).stdout)
    assert ours["prompt_ids"][0] == HF_ARCH["bos_token_id"] and len(ours["new_ids"]) == 16
    # ids, not text: decoding random byte-fallback ids (invalid UTF-8) differs between sentencepiece
    # and the HF ByteFallback decoder, which is the tokenizer's business, not the model's
    assert (ours["prompt_ids"], ours["new_ids"]) == (theirs["prompt_ids"], theirs["new_ids"])


def test_bf16_export_loads_generates_and_tokenizes_like_bigtrain(imported, work):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenizer import Tokenizer

    out = work / "hf-bf16"
    tool("convert_to_hf", "--checkpoint", imported, "--output", out, "--dtype", "bf16")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert model.dtype == torch.bfloat16 and not info["missing_keys"] and not info["unexpected_keys"]

    hf_tok = AutoTokenizer.from_pretrained(out)
    tag = imported / (imported / "latest").read_text().strip()
    ours = Tokenizer.load(tag / "tokenizer")
    ids = hf_tok(MIXED_TEXT)["input_ids"]
    assert ids == ours.encode(MIXED_TEXT, add_bos=True) and len(ids) > 20
    assert hf_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids[1:]) == MIXED_TEXT
    assert (config["bos_token_id"], config["eos_token_id"]) == (ours.bos_id, ours.eos_id)

    model.generation_config.eos_token_id = None
    with torch.no_grad():
        new = model.generate(torch.tensor([ids[:5]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert new.shape == (1, 13) and new.dtype == torch.long
    # the export decodes generated ids (random weights: byte tokens included) by HF's decoder chain over
    # bigtrain's own pieces. Not sentencepiece's decode: for the bytes B4 73 2F it gives "\ufffds/", HF "\ufffd" x3
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ours.model_path))
    generated = new[0, 5:].tolist()
    assert hf_tok.decode(generated) == byte_fallback_text([sp.id_to_piece(i) for i in generated])
