"""In-process checks: packed-batch loss and attention boundaries (acceptance 1), data readers and their
bad-input handling, optimizer choice / layer-wise LR groups, metrics and early stopping on crafted curves."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bigtrain.config import load_config
from bigtrain.finetune import data as d
from bigtrain.finetune.trainer import EarlyStopping, classification_metrics

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def sft_model():
    """A tiny SFT model, built without any process group (tensor size 1)."""
    from bigtrain.registry import build_model

    cfg = load_config(
        None,
        [
            "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
            "model.ffn_hidden_size=128", "model.seq_length=32", "model.vocab_size=100", "train.device=cpu",
            "finetune.task=sft", "finetune.train=unused", "data.tokenizer=unused", "model.init_std=0.2",
        ],
    ).resolve(1)  # fmt: skip
    return cfg, build_model(cfg).eval()


def _reference_logits(model, tokens: list[int]) -> torch.Tensor:
    """One example alone through pretraining's code path (plain tensors: causal SDPA, positions 0..n-1)."""
    x = model.embedding(torch.tensor([tokens]))  # [n, 1, h]
    for block in model.blocks:
        x = block(x)
    return model.output(model.final_norm(x))[:, 0, :100]  # [n, vocab]


def test_packed_loss_is_response_only_cross_entropy_without_cross_attention(sft_model):
    cfg, model = sft_model
    examples = [  # tokens, trained (response) flags
        d.Example([1, 10, 11, 12, 20, 21, 2], [False, False, False, False, True, True, True]),
        d.Example([1, 30, 31, 40, 2], [False, False, False, True, True]),
        d.Example([1, 50, 51, 52, 53, 60, 61, 62, 2], [False] * 5 + [True] * 4),
        d.Example([1, 70, 80, 2], [False, False, True, True]),
    ]
    seqs = d.pack(examples, 32, pad_id=3, packing=True)
    assert len(seqs) == 1  # 25 tokens: all four share one sequence
    b = d.collate(seqs)
    assert b["positions"][0, :7].tolist() == list(range(7)) and b["positions"][0, 7:12].tolist() == list(
        range(5)
    )
    with torch.no_grad():
        loss = model(b["tokens"], b["positions"], b["doc_ids"], b["labels"], b["loss_mask"])
        packed_logits = model.outputs(b["tokens"], b["positions"], b["doc_ids"])[:, 0, :100]  # [s, vocab]
    total, count, start = 0.0, 0, 0
    for ex in examples:
        n = len(ex.tokens)
        ref = _reference_logits(model, ex.tokens)
        # attention and positions stay inside the example: identical logits packed or alone
        assert (packed_logits[start : start + n] - ref).abs().max() < 1e-5
        logp = F.log_softmax(ref.detach().double(), dim=-1)
        for p in range(n - 1):
            if ex.target[p + 1]:  # predict a response token (or the EOS after it)
                total -= float(logp[p, ex.tokens[p + 1]])
                count += 1
        start += n
    assert count == 3 + 2 + 4 + 2
    assert abs(float(loss) - total / count) < 1e-5
    # and the prompt tokens really are excluded: training on them too would change the loss
    everything = b["loss_mask"].clone()
    everything[0, :24] = 1
    everything[0, [6, 11, 20]] = 0  # last token of each example predicts nothing
    with torch.no_grad():
        assert (
            abs(
                float(model(b["tokens"], b["positions"], b["doc_ids"], b["labels"], everything))
                - total / count
            )
            > 1e-3
        )


def test_unpacked_sequences_and_truncation(tok_dir: Path, tmp_path: Path):
    chat = d.ChatTemplate(tok_dir)
    rows = [{"prompt": "a b", "response": "b a"}, {"prompt": "a b c d e f g h a b c d", "response": "c d"}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, stats = d.read_sft(str(path), "k", chat, 16, "truncate", False)
    assert stats.truncated == 0 and stats.dropped == 1  # truncation left no response token: dropped
    examples, stats = d.read_sft(str(path), "k", chat, 64, "drop", False)
    assert len(examples) == 2 and len(d.pack(examples, 64, 3, packing=False)) == 2
    examples, stats = d.read_sft(str(path), "k", chat, 24, "truncate", False)
    assert stats.truncated == 1 and len(examples[1].tokens) == 24
    # the served prompt (BOS from the template, no BOS added in code), then the reply "b a" and EOS trained
    prompt = chat.hf.apply_chat_template([{"role": "user", "content": "a b"}], add_generation_prompt=True)
    prompt = prompt["input_ids"]
    assert prompt[0] == chat.hf.bos_token_id and prompt.count(chat.hf.bos_token_id) == 1
    reply = chat.hf.encode("b a", add_special_tokens=False) + [chat.hf.eos_token_id]
    n = len(prompt) + len(reply)
    assert examples[0].tokens[:n] == prompt + reply
    assert examples[0].target[:n] == [False] * len(prompt) + [True] * len(reply)
    assert not any(examples[0].target[n:])  # the newline after EOS is not trained


def test_bad_input_is_counted_or_strict_error(tok_dir: Path, tmp_path: Path):
    tok = __import__("tokenizer").Tokenizer.load(tok_dir)
    chat = d.ChatTemplate(tok_dir)
    lines = [
        json.dumps({"prompt": "a", "response": "a"}),
        "{not json",
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"prompt": "a", "response": "  "}),
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                 {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                                 {"role": "assistant", "content": "d"}]}),
    ]  # fmt: skip
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    examples, stats = d.read_sft(str(path), "k", chat, 64, "truncate", False)
    assert len(examples) == 2 and stats.lines == 5
    assert stats.skipped == {"malformed": 1, "unknown role": 1, "empty response": 1}
    assert (
        sum(examples[1].target) == len(tok.encode("b")) + len(tok.encode("d")) + 2
    )  # two replies + EOS each
    with pytest.raises(d.DataError, match=rf"{path}:2: malformed JSON"):
        d.read_sft(str(path), "k", chat, 64, "truncate", True)
    cls = tmp_path / "cls.jsonl"
    cls.write_text('{"text": "a b", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": 7}\n')
    valid = tmp_path / "valid.jsonl"
    valid.write_text(
        '{"text": "a", "label": "x"}\n{"text": "a", "label": "zzz"}\n{"text": "", "label": "x"}\n'
    )
    _, _, labels = d.read_classify(str(cls), "k", chat.hf, 16, "truncate", False, None)
    assert labels == ["7", "x", "y"]  # integers first, then strings, each sorted
    examples, stats, _ = d.read_classify(str(valid), "v", chat.hf, 16, "truncate", False, labels)
    assert len(examples) == 1 and stats.skipped == {"unknown label": 1, "malformed": 1}
    with pytest.raises(d.DataError, match=rf"{valid}:2: label 'zzz' is not one of the training labels"):
        d.read_classify(str(valid), "v", chat.hf, 16, "truncate", True, labels)
    with pytest.raises(d.DataError, match="cannot load the Hugging Face tokenizer"):
        d.ChatTemplate(tmp_path)
    with pytest.raises(d.DataError, match="matches no file"):
        d.expand_paths(str(tmp_path / "none*.jsonl"), "finetune.train")


def test_optimizers_and_layer_wise_lr(sft_model):
    from bigtrain.engine import build_optimizer
    from bigtrain.finetune.model import freeze
    from bigtrain.registry import build_model, local_parameters

    # a config and model of its own: this test sets optimizer and freezing fields, which the module
    # fixture's other users must not see
    cfg = copy.deepcopy(sft_model[0])
    model = build_model(cfg)
    cfg.optim.layer_decay = 0.5
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for lp, p in local_parameters(model, cfg).values():
        depth = {0: 3, 1: 2, 2: 1}.get(lp.index, 0)  # embedding, block 1, block 2, then norm/head
        assert math.isclose(lr_of[id(p)], cfg.optim.lr * 0.5**depth)
    cfg.optim.layer_decay = 1.0
    for name, cls in (("sgd", torch.optim.SGD), ("rmsprop", torch.optim.RMSprop), ("adam", torch.optim.Adam)):
        cfg.optim.name = name
        assert type(build_optimizer(cfg, model, torch.device("cpu"))) is cls
    cfg.optim.name = "adamw"
    cfg.finetune.freeze_embeddings, cfg.finetune.freeze_layers = True, 1
    freeze(model, cfg, local_parameters(model, cfg))
    trained = {
        id(p) for g in build_optimizer(cfg, model, torch.device("cpu")).param_groups for p in g["params"]
    }
    for lp, p in local_parameters(model, cfg).values():
        assert (id(p) in trained) == (lp.index >= 2), lp.key


def test_early_stopping_on_crafted_curves():
    losses = [2.0, 1.5, 1.6, 1.4, 1.45, 1.41, 1.5, 1.3]
    stop = EarlyStopping("val_loss", patience=3, min_delta=0.0)
    stopped = next(step for step, v in enumerate(losses, 1) if (stop.update(step, v), stop.should_stop)[1])
    assert stopped == 7 and stop.best == 1.4 and stop.best_step == 4
    acc = [0.5, 0.7, 0.705, 0.69, 0.9, 0.9]
    stop = EarlyStopping("val_accuracy", patience=2, min_delta=0.01)
    flags = [(stop.update(step, v), stop.should_stop) for step, v in enumerate(acc, 1)]
    assert (
        [f[0] for f in flags] == [True, True, False, False, True, False]
        and flags[3][1]
        and stop.best_step == 5
    )
    never = EarlyStopping("val_loss", patience=0)
    assert not any((never.update(i, 1.0), never.should_stop)[1] for i in range(10))


def test_classification_metrics_match_definitions():
    preds = [0, 0, 1, 2, 2, 2, 1, 0]
    labels = [0, 1, 1, 2, 2, 0, 1, 2]
    m = classification_metrics(preds, labels, 3)
    assert m["val_confusion"] == [[1, 0, 1], [1, 2, 0], [1, 0, 2]]
    # per class: precision 1/3, 2/2, 2/3; recall 1/2, 2/3, 2/3
    p, r = [1 / 3, 1.0, 2 / 3], [1 / 2, 2 / 3, 2 / 3]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, r)]
    assert math.isclose(m["val_accuracy"], 5 / 8)
    assert math.isclose(m["val_precision"], sum(p) / 3) and math.isclose(m["val_recall"], sum(r) / 3)
    assert math.isclose(m["val_f1"], sum(f1) / 3)


def test_cli_strict_names_file_and_line_and_missing_template_is_clear(tok_dir: Path, tmp_path: Path):
    import shutil
    import sys

    from tests.conftest import run_cmd
    from tests.finetune.helpers import SFT_TINY

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": ""}\n')
    cmd = [sys.executable, "-m", "bigtrain.finetune", "--config", SFT_TINY, "--set", f"data.tokenizer={tok_dir}",
           f"finetune.train={bad}", "finetune.valid=null", f"train.run_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = run_cmd([*cmd, "--strict"], check=False, timeout=120)
    assert proc.returncode == 2 and f"{bad}:2: empty response" in proc.stderr, proc.stderr
    bare = tmp_path / "bare_tokenizer"
    shutil.copytree(tok_dir, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    cmd[cmd.index(f"data.tokenizer={tok_dir}")] = f"data.tokenizer={bare}"
    proc = run_cmd(cmd, check=False, timeout=120)
    assert (
        proc.returncode == 2
        and "no chat template" in proc.stderr
        and "chat_template --tokenizer" in proc.stderr
    )


def test_lora_dropout_is_one_mask_over_the_full_input():
    """A row-parallel adapter's input is its tensor rank's slice of the features: each rank keeps its
    slice of one mask over the full input and draws as many random numbers as the unsharded model, so
    TP=2 ranks (the same RNG state) together apply TP=1's mask and stay in step with it. Inverted
    dropout in train mode; eval mode is the identity and draws nothing."""
    from bigtrain.finetune.lora import LoRADropout

    p, x = 0.25, torch.rand(6, 3, 8) + 1  # [s, b, in], no zeros

    def draw(module: LoRADropout, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(7)
        return module(inp), torch.get_rng_state()

    full, state = draw(LoRADropout(p), x)
    slices = [draw(LoRADropout(p, rank, 2), x[..., 4 * rank : 4 * rank + 4]) for rank in range(2)]
    assert torch.equal(torch.cat([out for out, _ in slices], dim=-1), full)
    assert all(torch.equal(after, state) for _, after in slices)
    assert not torch.equal(slices[0][0] == 0, slices[1][0] == 0)  # the halves are not one mask twice
    kept = full != 0
    assert torch.allclose(full[kept], x[kept] / (1 - p)) and 0.1 < 1 - kept.float().mean() < 0.4
    module, rng = LoRADropout(p).eval(), torch.get_rng_state()
    assert module(x) is x and torch.equal(torch.get_rng_state(), rng)


def test_resume_compares_the_recorded_chat_template(tok_dir: Path, tmp_path: Path):
    """resume_rules.check_chat_template: the recorded template unchanged passes; another one in the
    tokenizer directory is refused naming its file; no record (older runs) or classification: not compared."""
    import shutil

    from bigtrain.config import ConfigError
    from bigtrain.resume_rules import check_chat_template

    tok = tmp_path / "tok"
    shutil.copytree(tok_dir, tok)
    cfg = load_config(str(Path(__file__).parents[2] / "configs" / "sft-tiny.yaml"), [f"data.tokenizer={tok}"])
    meta = {"chat_template": d.template_record(d.ChatTemplate(tok))}
    assert meta["chat_template"]["tokenizer_fingerprint"] is not None
    check_chat_template(cfg, meta, "CKPT")
    d.save_chat_template(tok, d.DEFAULT_CHAT_TEMPLATE.replace("<|", "<<|"))
    with pytest.raises(
        ConfigError, match=rf"chat template in {re.escape(str(tok / 'tokenizer_config.json'))} .* differs"
    ):
        check_chat_template(cfg, meta, "CKPT")
    check_chat_template(cfg, {}, "CKPT")
    cfg.finetune.task = "classify"
    check_chat_template(cfg, meta, "CKPT")


class _Crash(Exception):
    """Stands for the process dying: nothing after the fault point runs."""


@pytest.mark.parametrize("point", ["moved_aside", "renamed", "removed"])
def test_save_best_crash_at_any_moment_never_loses_best(tmp_path: Path, monkeypatch, point):
    """save_best's swap of RUN_DIR/best interrupted at each step of checkpoint_files.replace_dir: the
    previous best (or, once renamed, the new one) survives complete, and start-up recovery restores it."""
    from types import SimpleNamespace

    from bigtrain import checkpoint, checkpoint_files
    from bigtrain.checkpoint_files import REPLACE_FAULT_POINTS, recover_dir, verify
    from bigtrain.finetune import trainer as ft

    assert point in REPLACE_FAULT_POINTS
    cfg = load_config(
        None, ["finetune.task=classify", "finetune.train=unused", "data.tokenizer=unused", "model.vocab_size=100", f"train.run_dir={tmp_path}"]
    ).resolve(1)  # fmt: skip
    dist = SimpleNamespace(is_main=True, writes_weights=True, dp_rank=0, tp_rank=0, pp_rank=0)
    trainer = SimpleNamespace(cfg=cfg, dist=dist, engine=None, state=SimpleNamespace(consumed_samples=0))
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(
        checkpoint, "fp32_master_weights", lambda engine, cfg: {"w": torch.full((4,), float(step))}
    )
    step = 10
    ft.save_best(trainer, step, {cfg.finetune.metric: 0.5})
    best, old = tmp_path / "best", tmp_path / "best.old"
    assert not verify(best) and json.loads((best / "bigtrain.json").read_text())["step"] == 10

    def crash(at: str) -> None:
        if at == point:
            raise _Crash(at)

    real = checkpoint_files.replace_dir
    monkeypatch.setattr(checkpoint_files, "replace_dir", lambda tmp, final: real(tmp, final, fault=crash))
    step = 20
    with pytest.raises(_Crash):
        ft.save_best(trainer, step, {cfg.finetune.metric: 0.7})
    # at the crash, a complete best is on disk under one of the two names
    survivors = [p for p in (best, old) if p.is_dir() and not verify(p)]
    assert survivors, f"crash at {point}: neither {best} nor {old} holds a complete best"
    recover_dir(best)  # what FinetuneTrainer does at start-up
    assert not old.exists() and not verify(best)
    saved = json.loads((best / "bigtrain.json").read_text())["step"]
    assert saved == (10 if point == "moved_aside" else 20)
    from safetensors.torch import load_file

    assert load_file(best / "weights" / "tp00_pp00.safetensors")["w"][0].item() == saved
    # the next save after recovery replaces it as usual
    monkeypatch.setattr(checkpoint_files, "replace_dir", real)
    step = 30
    ft.save_best(trainer, step, {cfg.finetune.metric: 0.9})
    assert json.loads((best / "bigtrain.json").read_text())["step"] == 30 and not old.exists()
