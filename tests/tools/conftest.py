"""Shared, session-scoped artifacts for the conversion tests (each built once, only when a test asks):

- checkpoints trained 3 steps by the real ``bigtrain.pretrain`` at TP=2xPP=2 (tied embeddings), TP=1 and
  DP=2 with ZeRO-3, on a learnable corpus, with a vocabulary (520) that needs padding;
- a bigtrain tokenizer trained by ``python -m tokenizer.train`` on mixed-language text;
- a random ``LlamaForCausalLM`` built by transformers (GQA, untied, vocab 400, rope theta 5000, eps 1e-6,
  weights scaled up so predictions are sharp and mapping mistakes move the loss), saved with the
  tokenizer's files, and its import at TP=2xPP=2 through ``tools/convert_from_hf.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, VENV_BIN, run_cmd
from tests.training.helpers import single, torchrun, train_args, write_corpus

TRUE_VOCAB = 520  # > the corpus' largest id (511), not a multiple of 128: exports must strip padding
SEQ = 32
TRAINED = {  # name -> (processes, overrides)
    "tp2pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "model.tie_embeddings=true"]),
    "tp1": (1, []),
    # persistence threshold 0: ZeRO-3 really partitions every tensor (the default keeps tiny ones whole)
    "dp2-zero3": (2, ["zero.stage=3", "zero.stage3_param_persistence_threshold=0"]),
}
HF_ARCH = {
    "vocab_size": 400,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 5000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": SEQ,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
MIXED_TEXT = "def main():\n    return 42  # café über straße, привет мир, 数据 模型 こんにちは 🙂\tfin"


def tool(name: str, *args: str, check: bool = True, timeout: float = 300):
    """Run ``tools/NAME.py`` as a subprocess (the real CLI)."""
    return run_cmd(
        [sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], timeout=timeout, check=check
    )


@contextlib.contextmanager
def venv_on_path():
    """For in-process distributed start-up: DeepSpeed JIT-builds its CPU shm op with the first ``ninja``
    on PATH; subprocesses get the venv's (cpu_env), so this process must too, or the two ninja versions
    invalidate each other's build log and every start-up recompiles the op."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", str(VENV_BIN) + os.pathsep + os.environ.get("PATH", ""))
        yield


def last_json(stdout: str) -> dict:
    """The last line of a tool's stdout as JSON (libraries may log lines before it)."""
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tools")


@pytest.fixture(scope="session")
def corpus(work) -> Path:
    return write_corpus(work / "corpus" / "patterns")


class Trained:
    """Checkpoints directories by layout name, trained on first use."""

    def __init__(self, work: Path, corpus: Path):
        self.work, self.corpus, self.done = work, corpus, {}

    def __call__(self, name: str) -> Path:
        if name not in self.done:
            nproc, overrides = TRAINED[name]
            run = self.work / f"run-{name}"
            args = train_args(self.corpus, run, f"model.vocab_size={TRUE_VOCAB}", *overrides, steps=3)
            single(args) if nproc == 1 else torchrun(nproc, args)
            self.done[name] = run / "checkpoints"
        return self.done[name]


@pytest.fixture(scope="session")
def trained(work, corpus) -> Trained:
    return Trained(work, corpus)


@pytest.fixture(scope="session")
def tokenizer_dir(work) -> Path:
    rng = np.random.default_rng(0)
    words = MIXED_TEXT.split() + "the of and to in is for on with as by at from this that".split()
    lines = [" ".join(rng.choice(words, 30)) + "\n    x += 1\n" for _ in range(300)]
    src = work / "tok_corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    out = work / "tokenizer"
    run_cmd(
        [
            sys.executable,
            "-m",
            "tokenizer.train",
            "--input",
            str(src),
            "--vocab-size",
            "400",
            "--output",
            str(out),
        ]
    )
    return out


def randomize(model) -> None:
    """Large random weights (sharp predictions that any mapping mistake moves), norms around 1, drawn
    from torch's global generator (callers seed it)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if "embed" in name or "lm_head" in name else 0.15)


def hf_model(config: dict):
    """A transformers model of a config.json's values (its ``model_type``), fp32, with :func:`randomize`'s
    weights (seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields), dtype=torch.float32).eval()
    torch.manual_seed(0)
    randomize(model)
    return model


def saved_and_imported(work: Path, configs: dict[str, dict]) -> dict[str, tuple]:
    """name -> (HF directory saved by transformers, the HF model, its TP1 import) for each config."""
    from tools.convert_from_hf import convert

    out = {}
    for name, config in configs.items():
        model = hf_model(config)
        model.save_pretrained(work / name)
        out[name] = (work / name, model, convert(work / name, work / f"{name}-tp1", progress=False))
    return out


def assert_round_trip(hf_dir: Path, back: Path, hf) -> dict[str, torch.Tensor]:
    """``back`` (the export of ``hf_dir``'s import) holds every tensor of ``hf_dir`` bitwise (same names,
    dtypes, values) and every config.json value; transformers loads it as ``hf``'s class with nothing
    missing or left over. Returns the original tensors by name."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def tensors(directory):
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    original, exported = tensors(hf_dir), tensors(back)
    assert set(original) == set(exported)
    assert all(
        original[k].dtype == exported[k].dtype and torch.equal(original[k], exported[k]) for k in original
    )
    a, b = (json.loads((d / "config.json").read_text()) for d in (hf_dir, back))
    assert {k: v for k, v in a.items() if k != "transformers_version"} == {
        k: b.get(k) for k in a if k != "transformers_version"
    }
    loaded, info = AutoModelForCausalLM.from_pretrained(back, output_loading_info=True, dtype=torch.float32)
    assert type(loaded) is type(hf) and not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    return original


def random_llama(**overrides):
    """A transformers-built LlamaForCausalLM with large random weights (sharp, layout-sensitive outputs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**HF_ARCH, **overrides})).eval()
    randomize(model)
    return model


@pytest.fixture(scope="session")
def hf_dir(work, tokenizer_dir) -> Path:
    out = work / "hf-random"
    random_llama().save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def imported(work, hf_dir) -> Path:
    out = work / "imported-tp2pp2"
    proc = tool(
        "convert_from_hf", "--hf", hf_dir, "--output", out, "--tensor-parallel", 2, "--pipeline-parallel", 2
    )
    assert "wrote" in proc.stdout
    return out
