"""Session fixtures for fine-tuning tests: a tiny letter tokenizer with a chat template, and a random HF
Llama imported with tools/convert_from_hf.py (the base model LoRA and freezing runs start from)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cmd
from tests.finetune.helpers import make_tokenizer

VOCAB = 310  # the letter tokenizer's size


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("ft_tok"))


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HF directory of a random LlamaForCausalLM, its bigtrain import at TP=1)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("ft_base")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "hf")
    run_cmd(
        [sys.executable, str(REPO / "tools" / "convert_from_hf.py"), "--hf", str(root / "hf"), "--output",
         str(root / "ckpt")],
        timeout=120,
    )  # fmt: skip
    return root / "hf", root / "ckpt"
