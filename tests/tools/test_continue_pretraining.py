"""Continue pretraining an imported model with its own tokenizer (issue 15, acceptance 3), as a user
would: a Llama 3.2-shaped model (published config, sizes shrunk, ``llama3`` rotary scaling, tied
embeddings) saved by transformers beside a Llama 3-style byte-level BPE tokenizer ->
``tools/convert_from_hf.py`` at TP2 -> ``tokenizer.preprocess`` with the imported tokenizer directory ->
``bigtrain.pretrain`` at TP2 (two processes) from those weights -> ``tools/convert_to_hf.py``. The loss
falls, the data holds the HF tokenizer's ids, and the export loads in transformers as ``llama`` with
the tokenizer files byte for byte."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch

from tests.conftest import run_cmd
from tests.tokenizer.corpus import make_corpus
from tests.tokenizer.hf_dirs import llama3_dir
from tests.tokenizer.test_preprocess import preprocess_cmd, read_dataset
from tests.tools.conftest import tool
from tests.tools.test_variants import PUBLISHED, SHRUNK
from tests.training.helpers import losses, torchrun

pytestmark = pytest.mark.slow

STEPS = 16


def test_imported_llama32_continues_pretraining_at_tp2_on_its_own_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = llama3_dir(tmp_path / "tokenizer")
    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    published = {
        k: v for k, v in PUBLISHED["llama-3.2-1b"].items() if k not in ("architectures", "model_type")
    }
    ids = dict(vocab_size=len(hf_tok), bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id)
    hf_config = LlamaConfig(**{**published, **SHRUNK, **ids})
    assert hf_config.rope_parameters["rope_type"] == "llama3" and hf_config.tie_word_embeddings
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    LlamaForCausalLM(hf_config).save_pretrained(hf_dir)
    for f in tok_dir.iterdir():
        shutil.copy2(f, hf_dir / f.name)

    ckpt = tmp_path / "imported"
    tool("convert_from_hf", "--hf", hf_dir, "--output", ckpt, "--tensor-parallel", 2)
    imported_tok = ckpt / "step_00000000" / "tokenizer"

    docs = [d for d in make_corpus(300, seed=5) if d.strip()]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = tmp_path / "data" / "text"
    run_cmd(preprocess_cmd([str(corpus)], imported_tok, prefix, "--workers", "2"), timeout=240)
    first = read_dataset(prefix)[0].tolist()
    assert first == hf_tok(docs[0])["input_ids"] + [hf_tok.eos_token_id]  # BOS ... EOS, the HF ids

    run = tmp_path / "run"
    args = ["--config", str(ckpt / "config.yaml"), "--set", f"checkpoint.load={ckpt}", f"data.train={prefix}"]
    args += ["data.mock=false", 'data.split="100,0,0"', "model.seq_length=64", "parallel.tensor=2"]
    args += ["train.micro_batch_size=4", "train.global_batch_size=8", f"train.steps={STEPS}"]
    args += [f"train.run_dir={run}", "train.eval_interval=0", "optim.lr=3e-3", "optim.warmup_steps=2"]
    proc = torchrun(2, args)
    assert f"loaded weights from {ckpt}" in proc.stdout
    curve = losses(run)
    assert len(curve) == STEPS  # from ln(711) = 6.57 to ~5.4 in 16 steps
    assert statistics.mean(curve[-4:]) < 0.9 * statistics.mean(curve[:4]), curve

    out = tmp_path / "export"
    tool("convert_to_hf", "--checkpoint", run / "checkpoints", "--output", out)
    exported = json.loads((out / "config.json").read_text())
    assert (exported["model_type"], exported["max_position_embeddings"]) == ("llama", 512)  # trained at 64
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM" and not info["missing_keys"], info
    assert model.config.rope_parameters["rope_type"] == "llama3"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tok_dir / name).read_bytes(), name
    assert AutoTokenizer.from_pretrained(out)(docs[1])["input_ids"] == hf_tok(docs[1])["input_ids"]
