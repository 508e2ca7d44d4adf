"""What SFT trains on equals what its export serves (issue 12 §4): for every example of several datasets and
chat templates, the ids the fine-tuning data preparation produces equal
``AutoTokenizer.from_pretrained(export).apply_chat_template(conversation, tokenize=True)`` of a model
imported (tools/convert_from_hf.py) and exported (tools/convert_to_hf.py) with that tokenizer; the trained
tokens are exactly each reply and its end-of-turn token; every prompt a server sends for turn i is the
trained sequence up to that reply. Templates: bigtrain's default (BOS, EOS after replies), ChatML
(``<|im_start|>``/``<|im_end|>``), Llama-3 (header tokens, ``<|eot_id|>``, trimmed content) on a bigtrain
tokenizer, and Llama-2 (``bos_token``/``eos_token``/``raise_exception``, system folded into the first turn)
on a Llama-2-style SentencePiece model (identity normalizer, dummy prefix) converted by transformers.
Special ids and flags of the export are checked against the SentencePiece model; template errors and
refusals name the template and the example's file:line."""

from __future__ import annotations

import json
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bigtrain.config import load_config
from bigtrain.finetune import data as d
from tests.conftest import run_cmd
from tests.finetune.helpers import SFT_TINY, write_jsonl

pytestmark = pytest.mark.timeout(600)

WORDS = "the quick brown fox jumps over a lazy dog what is two plus four six yes no hello world".split()
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA2 = (  # the Llama-2-chat template as published with the model on the Hub
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


@dataclass
class Case:
    template: str | None  # None: bigtrain's default, stored by the CLI without --template
    reply: Callable[[str], str]  # an assistant message's content -> the text trained for it
    end_of_turn: str  # the token replies end with (generation stops on it)
    llama2_tokenizer: bool = False


CASES = {
    "default": Case(None, lambda c: c + "</s>", "</s>"),
    "chatml": Case(CHATML, lambda c: c + "<|im_end|>", "<|im_end|>"),
    "llama3": Case(LLAMA3, lambda c: c.strip() + "<|eot_id|>", "<|eot_id|>"),
    "llama2": Case(LLAMA2, lambda c: " " + c.strip() + " </s>", "</s>", llama2_tokenizer=True),
}


def conversations(n: int, seed: int) -> list[list[dict]]:
    """Alternating user/assistant turns (1-3), a system message in half of them; contents with newlines,
    trailing whitespace, and empty assistant replies in earlier turns."""
    rng = random.Random(seed)

    def text(lo: int = 1, hi: int = 6) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    out = []
    for k in range(n):
        messages = [{"role": "system", "content": text()}] if k % 2 else []
        turns = rng.randint(1, 3)
        for t in range(turns):
            user = text() + (f"\n{text()}" if rng.random() < 0.3 else "")
            reply = text()
            if t < turns - 1 and rng.random() < 0.2:
                reply = ""  # an empty reply: only its end-of-turn token is trained
            elif rng.random() < 0.3:
                reply += rng.choice([" ", "  ", "\n"])  # trailing whitespace
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        out.append(messages)
    return out


def store_template(tok_dir: Path, template: str | None, tmp: Path) -> None:
    """Through the CLI's code path (rendering the sample conversation before storing)."""
    from bigtrain.finetune import chat_template

    args = ["--tokenizer", str(tok_dir)]
    if template is not None:
        (tmp / "template.jinja").write_text(template)
        args += ["--template", str(tmp / "template.jinja")]
    chat_template.main(args)


def bigtrain_tokenizer(root: Path) -> Path:
    """``python -m tokenizer.train`` with the ChatML and Llama-3 markers as special tokens."""
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) for _ in range(12)) + "\n" + " ".join(rng.choice(WORDS) for _ in range(5))
            for _ in range(400)]  # fmt: skip
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": t} for t in docs])
    out = root / "bigtrain_tok"
    run_cmd([sys.executable, "-m", "tokenizer.train", "--input", str(corpus), "--vocab-size", "400", "--output",
             str(out), "--special-tokens", *SPECIALS], timeout=180)  # fmt: skip
    return out


def llama2_tokenizer(root: Path) -> Path:
    """A Llama-2/Mistral-style tokenizer: SentencePiece BPE with identity normalization and a dummy prefix
    (no pad), its HF files made by transformers' own conversion (as Hub Llama-2 directories hold them),
    the template saved the transformers-5 way (chat_template.jinja)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    rng = random.Random(2)
    text = root / "llama2_corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(600)) + "\n")
    src = root / "llama2_src"
    src.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(src / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    out = root / "llama2_tok"
    tok = LlamaTokenizer.from_pretrained(str(src))
    tok.chat_template = LLAMA2
    tok.save_pretrained(str(out))
    shutil.copy2(src / "tokenizer.model", out / "tokenizer.model")
    assert (out / "chat_template.jinja").is_file()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """case name -> (the imported checkpoint's tokenizer directory, the HF export directory), built on first use:
    a random tiny Llama + the case's tokenizer -> convert_from_hf -> convert_to_hf."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tools.convert_from_hf import convert
    from tools.convert_to_hf import export

    root = tmp_path_factory.mktemp("chat_format")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    ))  # fmt: skip
    model.save_pretrained(root / "model")
    bigtrain_tok: list[Path] = []
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            case, work = CASES[name], root / name
            work.mkdir()
            if case.llama2_tokenizer:
                tok = llama2_tokenizer(work)
            else:
                bigtrain_tok.append(bigtrain_tok[0] if bigtrain_tok else bigtrain_tokenizer(root))
                tok = work / "tokenizer"
                shutil.copytree(bigtrain_tok[0], tok)
                store_template(tok, case.template, work)
            hf = work / "hf"
            shutil.copytree(root / "model", hf)
            for f in tok.iterdir():
                shutil.copy2(f, hf / f.name)
            ckpt = convert(hf, work / "ckpt", progress=False)
            done[name] = ckpt / "step_00000000" / "tokenizer", export(ckpt, work / "export", progress=False)
        return done[name]

    return get


def prepared_sft(tokenizer: Path, train: Path, seq: int = 512, strict: bool = True):
    """The fine-tuning start-up's data preparation (bigtrain.finetune.__main__.prepare), no packing."""
    from bigtrain.finetune.__main__ import prepare

    cfg = load_config(SFT_TINY, [f"data.tokenizer={tokenizer}", f"finetune.train={train}", "finetune.valid=null",
                                 "finetune.packing=false", f"model.seq_length={seq}", "model.vocab_size=400"]).resolve(1)  # fmt: skip
    cfg.finetune.strict = strict
    logged: list[str] = []
    return prepare(cfg, logged.append), logged


@pytest.mark.parametrize("name", list(CASES))
def test_trained_ids_equal_export_apply_chat_template(name: str, built, tmp_path: Path):
    """Every example: ids equal, trained text is exactly each reply + its end-of-turn token, and each
    served prompt (messages[:i], add_generation_prompt) is the trained sequence up to reply i."""
    from transformers import AutoTokenizer

    case = CASES[name]
    tokenizer, exported = built(name)
    convs = conversations(50, seed=len(name))
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in convs])
    prepared, logged = prepared_sft(tokenizer, train)
    assert f"{len(convs)} examples used" in "\n".join(logged)
    hf = AutoTokenizer.from_pretrained(exported)
    chat = d.ChatTemplate(tokenizer)
    for conv, item in zip(convs, prepared.train, strict=True):
        want = hf.apply_chat_template(conv, tokenize=True)["input_ids"]
        n = len(want)
        assert item["tokens"][:n].tolist() == want, conv
        # trained positions: the loss at p predicts token p+1, so token t is trained iff loss_mask[t-1]
        trained = [False] + [bool(m) for m in item["loss_mask"][: n - 1]]
        assert not item["loss_mask"][n - 1 :].any()
        text = chat.render(conv, add_generation_prompt=False)
        offsets = hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        runs, start = [], None  # maximal runs of trained tokens, as [first, last + 1)
        for t, flag in enumerate([*trained, False]):
            if flag and start is None:
                start = t
            elif not flag and start is not None:
                runs.append((start, t))
                start = None
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        assert [text[offsets[a][0] : offsets[b - 1][1]] for a, b in runs] == [case.reply(c) for c in replies]
        assistant_turns = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        for (a, _), i in zip(runs, assistant_turns):
            served = hf.apply_chat_template(conv[:i], add_generation_prompt=True, tokenize=True)["input_ids"]
            assert want[:a] == served, (conv, i)


@pytest.mark.parametrize("name", ["default", "chatml", "llama2"])
def test_export_special_ids_flags_and_generation_config_match_the_source(name: str, built):
    """config.json / generation_config.json / tokenizer files against the SentencePiece model: BOS/EOS/PAD/UNK
    ids, BOS added to plain text, special-token strings read as tokens, generation stops on the template's
    end-of-turn token as well as EOS; no id written as -1."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    case = CASES[name]
    tokenizer, exported = built(name)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(exported)
    config = json.loads((exported / "config.json").read_text())
    generation = json.loads((exported / "generation_config.json").read_text())
    pad = sp.pad_id() if sp.pad_id() >= 0 else None
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (
        sp.bos_id(), sp.eos_id(), sp.unk_id(), pad
    )  # fmt: skip
    assert (config["bos_token_id"], config["eos_token_id"], config.get("pad_token_id")) == (
        sp.bos_id(), sp.eos_id(), pad
    )  # fmt: skip
    end = sp.piece_to_id(case.end_of_turn)
    stop = sp.eos_id() if end == sp.eos_id() else [sp.eos_id(), end]
    assert generation == {
        "bos_token_id": sp.bos_id(),
        "eos_token_id": stop,
        **({"pad_token_id": pad} if pad else {}),
    }
    # the template's special-token strings are those tokens, as in apply_chat_template
    assert hf("<s></s>", add_special_tokens=False)["input_ids"] == [sp.bos_id(), sp.eos_id()]
    if not case.llama2_tokenizer:  # bigtrain's tokenizer: plain text gets BOS, like SentencePiece add_bos
        text = "the quick <s> brown fox"
        assert json.loads((exported / "tokenizer_config.json").read_text())["add_bos_token"] is True
        assert hf(text, split_special_tokens=True)["input_ids"] == sp.encode(text, add_bos=True)


def test_export_refuses_tokenizer_files_that_disagree_with_the_model(built, tmp_path: Path):
    from tools.convert_to_hf import ExportError, special_ids

    tokenizer, _ = built("default")
    drifted = tmp_path / "tok"
    shutil.copytree(tokenizer, drifted)
    assert special_ids({}, drifted) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((drifted / name).read_text())
        (drifted / name).write_text(json.dumps({**config, "eos_token": "<unk>"}))
    with pytest.raises(ExportError, match=r"make eos id 0 but .*tokenizer.model has 2"):
        special_ids({}, drifted)


def test_per_turn_encoding_differs_from_whole_text_on_llama2_tokenizer(built):
    """The control: bigtrain's former encoding (BOS added in code, each turn encoded by SentencePiece on its
    own) is not what the export serves on a dummy-prefix model: a '▁' before every reply."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer, exported = built("llama2")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    hf, chat = AutoTokenizer.from_pretrained(exported), d.ChatTemplate(tokenizer)
    convs = conversations(50, seed=7)
    differ = 0
    for conv in convs:
        ids, done = [sp.bos_id()], ""
        for i, m in enumerate(conv):
            if m["role"] == "assistant":
                prompt, full = chat.render(conv[:i], True), chat.render(conv[: i + 1], False)
                ids += sp.encode(prompt[len(done) :]) + sp.encode(full[len(prompt) :]) + [sp.eos_id()]
                done = full
        differ += ids != hf.apply_chat_template(conv, tokenize=True)["input_ids"]
        assert chat.encode(conv).tokens == hf.apply_chat_template(conv, tokenize=True)["input_ids"]
    assert differ == len(convs)


def test_template_errors_name_the_template_and_the_line(built, tmp_path: Path):
    """raise_exception on a bad role order: the line is skipped and counted, or with --strict the run stops
    (exit 2) naming file:line and the template; an undefined variable and a syntax error stop it always."""
    tokenizer, _ = built("llama2")
    rows = [
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "no"}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    chat = d.ChatTemplate(tokenizer)
    examples, stats = d.read_sft(str(path), "k", chat, 256, "truncate", False)
    assert len(examples) == 1 and stats.skipped == {"refused by the chat template": 1}
    template = tokenizer / "chat_template.jinja"
    with pytest.raises(d.DataError) as e:
        d.read_sft(str(path), "k", chat, 256, "truncate", True)
    assert str(e.value) == (
        f"{path}:2: chat template {template} refused it: Conversation roles must alternate "
        "user/assistant/user/assistant/..."
    )
    broken = tmp_path / "broken"
    shutil.copytree(tokenizer, broken)
    (broken / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] + sep_token }}{% endfor %}"
    )
    with pytest.raises(d.DataError) as e:
        d.read_sft(str(path), "k", d.ChatTemplate(broken), 256, "truncate", False)
    assert str(e.value) == (
        f"{path}:1: chat template {broken / 'chat_template.jinja'}: UndefinedError: 'sep_token' is undefined"
    )
    (broken / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(d.DataError, match=rf"^{broken / 'chat_template.jinja'}: chat template syntax error at "
                       "template line 2: unexpected '}'$"):  # fmt: skip
        d.ChatTemplate(broken)
    # the real entry point: exit 2 before step 1, one line
    cmd = [sys.executable, "-m", "bigtrain.finetune", "--config", SFT_TINY, "--set", f"data.tokenizer={tokenizer}",
           f"finetune.train={path}", "finetune.valid=null", f"train.run_dir={tmp_path / 'run'}", "--strict"]  # fmt: skip
    proc = run_cmd(cmd, check=False, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert f"data error: {path}:2: chat template {template} refused it: Conversation roles" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_storing_a_template_renders_a_sample_and_refuses_a_failing_one(tok_dir: Path, tmp_path: Path):
    """The CLI stores a Llama-2 template (it refuses system messages: checked without one) and the default;
    it refuses templates that fail in transformers' environment, naming the file, and stores nothing."""
    tok = tmp_path / "tok"
    shutil.copytree(tok_dir, tok)
    before = (tok / "tokenizer_config.json").read_text()
    for i, (template, error) in enumerate([
        ("{{ messages[0]['content'] + undefined_thing }}", "UndefinedError: 'undefined_thing' is undefined"),
        ("{{ raise_exception('no system messages, no two turns') }}", "refused it: no system messages, no two turns"),
        ("{% for m in messages %}{{ m.content }}{% endfor %}{% if x %}", "chat template syntax error at template line 1"),
    ]):  # fmt: skip
        file = tmp_path / f"bad{i}.jinja"
        file.write_text(template)
        proc = run_cmd([sys.executable, "-m", "bigtrain.finetune.chat_template", "--tokenizer", str(tok),
                        "--template", str(file)], check=False, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and str(file) in proc.stderr and error in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (tok / "tokenizer_config.json").read_text() == before
    store_template(tok, LLAMA2, tmp_path)
    assert d.ChatTemplate(tok).template == LLAMA2
    # a template stored by an earlier bigtrain (no EOS after replies) still trains as the export serves it
    old = "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endfor %}"
    d.save_chat_template(tok, old + "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    chat = d.ChatTemplate(tok)
    conv = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "b a"}]
    assert chat.encode(conv).tokens == chat.hf.apply_chat_template(conv, tokenize=True)["input_ids"]
    assert chat.end_of_turn_ids() == [] and "warning" in chat.describe()


def test_template_with_generation_blocks_trains_what_transformers_marks(tok_dir: Path, tmp_path: Path):
    """A template with ``{% generation %}`` blocks: the trained tokens are transformers' own
    ``return_assistant_tokens_mask``, here each reply, EOS and the newline after it (the control: without
    the blocks, the newline after EOS is not trained)."""
    tok = tmp_path / "tok"
    shutil.copytree(tok_dir, tok)
    marked = (
        "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token + '\\n' }}"
        "{% endgeneration %}{% else %}{{ message['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    store_template(tok, marked, tmp_path)
    chat = d.ChatTemplate(tok)
    conv = [{"role": "system", "content": "a"}, {"role": "user", "content": "a b c"},
            {"role": "assistant", "content": "c b a"}, {"role": "user", "content": "d"},
            {"role": "assistant", "content": ""}, {"role": "user", "content": "e f"},
            {"role": "assistant", "content": "f e "}]  # fmt: skip
    want = chat.hf.apply_chat_template(conv, return_assistant_tokens_mask=True)
    example = chat.encode(conv)
    assert example.tokens == want["input_ids"]
    replies = [len(chat.hf.encode(m["content"] + "</s>\n", add_special_tokens=False)) for m in conv[2::2]]
    assert [int(t) for t in example.target] == want["assistant_masks"] and sum(example.target) == sum(replies)
    chat._generation = False
    assert sum(chat.encode(conv).target) == sum(replies) - 3


def test_generate_chat_sends_the_served_prompt_from_checkpoint_and_export(built):
    """tools/generate.py --chat: the bigtrain checkpoint and its export send the same prompt ids,
    apply_chat_template(add_generation_prompt=True), and generate the same tokens."""
    from transformers import AutoTokenizer

    from tests.tools.conftest import last_json, tool

    tokenizer, exported = built("chatml")
    checkpoint = tokenizer.parent.parent
    args = [
        "--prompt",
        "what is two plus four",
        "--chat",
        "--greedy",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
    ]
    ours = last_json(tool("generate", "--checkpoint", checkpoint, *args, "--json").stdout)
    theirs = last_json(tool("generate", "--hf", exported, *args, "--json").stdout)
    served = AutoTokenizer.from_pretrained(exported).apply_chat_template(
        [{"role": "user", "content": "what is two plus four"}], add_generation_prompt=True
    )["input_ids"]
    assert ours["prompt_ids"] == theirs["prompt_ids"] == served
    assert ours["new_ids"] == theirs["new_ids"] and len(ours["new_ids"]) == 6


def test_storing_into_an_imported_checkpoint_is_refused(built, capsys):
    """The tokenizer inside a convert_from_hf checkpoint is checksummed by its manifest: storing a template
    there would make the checkpoint fail verification, so the CLI names it and the remedy."""
    from bigtrain.finetune import chat_template

    tokenizer, _ = built("chatml")
    before = (tokenizer / "tokenizer_config.json").read_text()
    with pytest.raises(SystemExit) as e:
        chat_template.main(["--tokenizer", str(tokenizer)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"belongs to checkpoint {tokenizer.parent.resolve()}" in err and "cp -r" in err
    assert (tokenizer / "tokenizer_config.json").read_text() == before


@pytest.mark.parametrize("name", ["default", "llama2"])
def test_classification_ids_equal_what_the_exported_classifier_is_given(name: str, built, tmp_path: Path):
    """The same kind of drift for classification: the ids trained equal the export tokenizer's ``tok(text)``
    (BOS as it adds it). Control: bigtrain's former ``[BOS] + sentencepiece`` differs on the Llama-2 files."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tokenizer, exported = built(name)
    rng = random.Random(3)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8))), "label": i % 2}
            for i in range(20)]  # fmt: skip
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    examples, _, _ = d.read_classify(str(path), "k", d.hf_tokenizer(tokenizer), 64, "truncate", True, None)
    served = AutoTokenizer.from_pretrained(exported)([r["text"] for r in rows])["input_ids"]
    assert [ex.tokens for ex in examples] == served
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    former = [sp.encode(r["text"], add_bos=True) for r in rows]
    assert (former == served) == (name == "default")


def test_export_and_resume_use_the_template_the_checkpoint_was_trained_with(tok_dir: Path, tmp_path: Path):
    """Train with template A, store template B in the same tokenizer directory: the export writes A (its
    apply_chat_template gives the trained ids) with one warning naming both; the relaunch is refused
    before start-up, naming the tokenizer's file and the remedy."""
    import hashlib

    from transformers import AutoTokenizer

    from tests.conftest import REPO
    from tests.finetune.helpers import reverse_rows, reverse_split
    from tests.training.helpers import assert_refused_before_start_up, single

    tok = tmp_path / "tok"
    shutil.copytree(tok_dir, tok)  # the session tokenizer keeps its template
    a = d.current_template(tok)
    train, _ = reverse_split(16, 0)
    write_jsonl(tmp_path / "train.jsonl", reverse_rows(train))
    run_dir = tmp_path / "run"
    args = ["--config", SFT_TINY, "--set", f"data.tokenizer={tok}", f"finetune.train={tmp_path / 'train.jsonl'}",
            "finetune.valid=null", f"train.run_dir={run_dir}", "optim.warmup_steps=0"]  # fmt: skip
    single([*args, "train.steps=2"], module="bigtrain.finetune")
    meta = json.loads((run_dir / "checkpoints" / "step_00000002" / "bigtrain.json").read_text())
    assert meta["chat_template"]["text"] == a
    assert meta["chat_template"]["sha256"] == hashlib.sha256(a.encode()).hexdigest()

    b = a.replace("{{ eos_token }}", "{{ eos_token + eos_token }}")  # B: two EOS after each reply
    store_template(tok, b, tmp_path)
    assert d.current_template(tok) == b
    conv = [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "c b a"}]
    trained = d.ChatTemplate(tok, a).encode(conv).tokens
    assert d.ChatTemplate(tok).encode(conv).tokens != trained  # the control: B renders other ids

    out = tmp_path / "export"
    proc = run_cmd([sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--checkpoint",
                    str(run_dir / "checkpoints"), "--output", str(out)], timeout=180)  # fmt: skip
    warnings = [x for x in proc.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 1 and str(tok / "tokenizer_config.json") in warnings[0], proc.stderr
    assert (
        "differs from the one" in warnings[0] and hashlib.sha256(b.encode()).hexdigest()[:12] in warnings[0]
    )
    assert (
        meta["chat_template"]["sha256"][:12] in warnings[0]
        and "the export uses the trained one" in warnings[0]
    )
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.chat_template == a
    assert hf.apply_chat_template(conv, tokenize=True)["input_ids"] == trained

    refused = single([*args, "train.steps=4"], module="bigtrain.finetune", no_start_up=True, check=False)
    assert_refused_before_start_up(
        refused, f"the chat template in {tok / 'tokenizer_config.json'}", "differs from the one the checkpoint",
        "restore that template", "checkpoint.load=",
    )  # fmt: skip
