"""Offline Hugging Face tokenizer directories shaped like the ones Llama 3 and Qwen2.5 ship.

Each is a byte-level BPE trained by ``tokenizers`` on the test corpus with the family's published
pre-tokenizer split regex, special tokens and ``tokenizer_config.json`` keys (values from
meta-llama/Llama-3.2-1B and Qwen/Qwen2.5-0.5B), saved through transformers' ``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.tokenizer.corpus import make_corpus

# Llama 3's tokenizer.json Split pattern (tiktoken cl100k-style, digits in groups of up to three)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: single digits
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
    "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _train(split: str, nfc: bool, specials: list[str], vocab_size: int, bos: str | None) -> Any:
    """A ``tokenizers.Tokenizer``: byte-level BPE on the mixed test corpus, specials after the BPE ids."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(ignore_merges=bos is not None))  # Llama 3's BPE sets ignore_merges
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(make_corpus(300, seed=5), trainer)
    tok.add_special_tokens(specials)
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tok.token_to_id(bos))],
            )
        )
    tok.post_processor = processors.Sequence(steps)
    return tok


def _save(tok: Any, out: Path, config: dict[str, Any]) -> Path:
    """``save_pretrained``, then the family's published tokenizer_config keys over what it wrote."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    keep = {k: written[k] for k in ("added_tokens_decoder",) if k in written}
    path.write_text(json.dumps({**keep, **config}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "special_tokens_map.json").unlink(missing_ok=True)
    return out


def llama3_dir(out: Path) -> Path:
    """Llama 3.2-style: BOS ``<|begin_of_text|>`` from the post-processor, EOS ``<|end_of_text|>``, no pad."""
    tok = _train(LLAMA3_SPLIT, False, LLAMA3_SPECIAL, 700, bos="<|begin_of_text|>")
    return _save(
        tok,
        out,
        {
            "bos_token": "<|begin_of_text|>",
            "chat_template": LLAMA3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|end_of_text|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )


def qwen2_dir(out: Path, extra_tokens: int = 0, split: str = QWEN2_SPLIT) -> Path:
    """Qwen2.5-style (class ``Qwen2Tokenizer``): NFC, no BOS, EOS and pad ``<|endoftext|>``.

    ``extra_tokens`` more added tokens ``<|extra_i|>`` after the specials (to pass 65535 ids); ``split``:
    the pre-tokenizer regex written to tokenizer.json (transformers' Qwen2Tokenizer uses its own).
    """
    specials = QWEN2_SPECIAL + [f"<|extra_{i}|>" for i in range(extra_tokens)]
    tok = _train(split, True, specials, 600, bos=None)
    return _save(
        tok,
        out,
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": None,
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )


def mistral_dir(out: Path, src: Path) -> Path:
    """Mistral/Llama-2-style: a SentencePiece BPE (byte fallback, dummy prefix, ``<unk>``/``<s>``/``</s>``,
    no pad) converted by transformers' own ``LlamaTokenizer``, ``tokenizer.model`` beside its HF files (as
    Hub directories hold them) and no ``bigtrain_tokenizer.json``. ``src``: a scratch directory."""
    import shutil

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    src.mkdir(parents=True)
    corpus = src / "corpus.txt"
    corpus.write_text("\n".join(make_corpus(300, seed=6)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(src / "tokenizer"), vocab_size=700, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        character_coverage=0.9995,
    )  # fmt: skip
    from tokenizers import Tokenizer, processors

    LlamaTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    shutil.copy2(src / "tokenizer.model", out / "tokenizer.model")
    # the Hub files' post-processor adds <s> (transformers 5 converts without it)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.save(str(out / "tokenizer.json"))
    config = {  # mistralai/Mistral-7B-v0.1's keys
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


BERT_WORDPIECE_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_dir(out: Path) -> Path:
    """bert-base-uncased-style: lowercasing WordPiece (``##`` continuations), ``[CLS] $A [SEP]`` and
    ``[CLS] $A [SEP] $B:1 [SEP]:1``, ids 0-4 = [PAD] [UNK] [CLS] [SEP] [MASK], no BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=BERT_WORDPIECE_SPECIAL, show_progress=False
    )
    tok.train_from_iterator(make_corpus(300, seed=5), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return _save(
        tok,
        out,
        {
            "cls_token": "[CLS]",
            "do_lower_case": True,
            "mask_token": "[MASK]",
            "model_max_length": 512,
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": "[UNK]",
        },
    )


def bert_sentencepiece_dir(out: Path) -> Path:
    """``python -m tokenizer.train --bert-specials`` (BPE, vocab 1000) on the mixed test corpus."""
    from tests.tokenizer.corpus import write_jsonl
    from tokenizer import train

    out.mkdir(parents=True, exist_ok=True)
    corpus = write_jsonl(out / "train.jsonl", make_corpus(400, seed=1))
    args = ["--input", str(corpus), "--vocab-size", "1000", "--output", str(out / "tok"), "--bert-specials"]
    if train.main(args) != 0:
        raise RuntimeError("tokenizer.train --bert-specials failed (its error is above)")
    return out / "tok"
