"""Fine-tuning data: JSONL readers (SFT prompt/response or chat messages; text classification), the chat
template kept in the tokenizer directory, packing, and epoch-wise micro-batch streams.

SFT examples become token ids plus a mask of the tokens the model is trained to produce (assistant
content and the EOS after it); everything the user, system or template says is context only.
Packed sequences carry ``positions`` (restarting at 0 per example) and ``doc_ids`` (-1 on padding) so
attention and rotary positions never cross example boundaries.
"""

from __future__ import annotations

import glob
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
Batch = dict[str, torch.Tensor]


class DataError(ValueError):
    """Bad fine-tuning input; the message names file:line (or the file/directory)."""


# ---------------------------------------------------------------------------- chat template
def load_chat_template(tokenizer_dir: str | Path) -> str:
    """The Jinja chat template of a tokenizer directory (``chat_template`` in tokenizer_config.json,
    which the HF export copies, so ``apply_chat_template`` renders the same text after export)."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    template = json.loads(path.read_text()).get("chat_template") if path.is_file() else None
    if not template:
        raise DataError(
            f"{tokenizer_dir}: no chat template (tokenizer_config.json has no 'chat_template'); add one with "
            f"python -m bigtrain.finetune.chat_template --tokenizer {tokenizer_dir} [--template FILE]"
        )
    return template


def save_chat_template(tokenizer_dir: str | Path, template: str = DEFAULT_CHAT_TEMPLATE) -> None:
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    if not path.is_file():
        raise DataError(f"{tokenizer_dir}: no tokenizer_config.json (not a bigtrain tokenizer directory)")
    config = json.loads(path.read_text())
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class ChatTemplate:
    """Renders messages like transformers' ``apply_chat_template`` (sandboxed Jinja, same options)."""

    def __init__(self, source: str):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(source)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)


# ---------------------------------------------------------------------------- reading
@dataclass
class Example:
    tokens: list[int]
    target: list[bool] | int  # sft: which tokens are trained; classify: the class id


@dataclass
class ReadStats:
    lines: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> lines
    truncated: int = 0
    dropped: int = 0  # over-long examples dropped (finetune.overlong=drop, or nothing left to train)

    def summary(self, name: str) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (
            f"{name}: {self.lines} lines, {self.used} examples used; over-long: {self.truncated} truncated, "
            f"{self.dropped} dropped; skipped: {skipped}"
        )


def expand_paths(spec: Any, key: str) -> list[Path]:
    """A path, a glob, or a list of them -> existing files (sorted per pattern)."""
    items = spec if isinstance(spec, list) else [spec]
    files: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(str(item)))
        if not matches:
            raise DataError(f"{key}: {item} matches no file")
        files += [Path(m) for m in matches]
    return files


def _records(files: list[Path], strict: bool, stats: ReadStats) -> Iterator[tuple[str, dict]]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                stats.lines += 1
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    _reject(where, f"malformed JSON ({e})", "malformed", strict, stats)
                    continue
                yield where, record


def _reject(where: str, message: str, reason: str, strict: bool, stats: ReadStats) -> None:
    if strict:
        raise DataError(f"{where}: {message}")
    stats.skipped[reason] += 1


class Rejected(ValueError):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _messages(record: dict) -> list[dict[str, str]]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise Rejected("'messages' must be a non-empty list", "malformed")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise Rejected(f"messages[{i}] needs a string 'content'", "malformed")
            if msg.get("role") not in ROLES:
                raise Rejected(
                    f"messages[{i}]: unknown role {msg.get('role')!r} ({'|'.join(ROLES)})", "unknown role"
                )
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise Rejected("no non-empty assistant message", "empty response")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise Rejected("expected string fields 'prompt' and 'response', or 'messages'", "malformed")
    if not response.strip():
        raise Rejected("empty response", "empty response")
    system = record.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    return [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def encode_chat(messages: list[dict[str, str]], tok, template: ChatTemplate) -> Example:
    """BOS + rendered context (not trained) + each assistant reply and EOS (trained). The context up to
    a reply is what ``apply_chat_template(..., add_generation_prompt=True)`` renders."""
    tokens, target = [tok.bos_id], [False]
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        full = template.render(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations as growing prefixes")
        context = tok.encode(prompt[len(done) :]) if prompt != done else []
        reply = tok.encode(full[len(prompt) :]) + [tok.eos_id]
        tokens += context + reply
        target += [False] * len(context) + [True] * len(reply)
        done = full
    return Example(tokens, target)


def _fit(example: Example, seq_length: int, overlong: str, stats: ReadStats) -> Example | None:
    if len(example.tokens) <= seq_length:
        return example
    if overlong == "drop":
        stats.dropped += 1
        return None
    stats.truncated += 1
    if isinstance(example.target, list):
        target = example.target[:seq_length]
        if not any(target[1:]):  # no trained token left to predict
            stats.truncated -= 1
            stats.dropped += 1
            return None
        return Example(example.tokens[:seq_length], target)
    return Example(example.tokens[:seq_length], example.target)


def read_sft(spec: Any, key: str, tok, template: ChatTemplate, seq_length: int, overlong: str, strict: bool):
    stats, examples = ReadStats(), []
    for where, record in _records(expand_paths(spec, key), strict, stats):
        try:
            example = encode_chat(_messages(record), tok, template)
        except Rejected as e:
            _reject(where, str(e), e.reason, strict, stats)
            continue
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        example = _fit(example, seq_length, overlong, stats)
        if example is not None:
            examples.append(example)
            stats.used += 1
    return examples, stats


def read_classify(
    spec: Any, key: str, tok, seq_length: int, overlong: str, strict: bool, labels: list[str] | None
) -> tuple[list[Example], ReadStats, list[str]]:
    """``labels``: the class names (None: taken from this data, sorted; ints numerically)."""
    stats, rows = ReadStats(), []
    known = None if labels is None else set(labels)
    for where, record in _records(expand_paths(spec, key), strict, stats):
        text, label = record.get("text"), record.get("label")
        if not isinstance(text, str) or not text.strip():
            _reject(where, "expected a non-empty string field 'text'", "malformed", strict, stats)
        elif not isinstance(label, (str, int)) or isinstance(label, bool):
            _reject(
                where, f"'label' must be a string or an integer, got {label!r}", "malformed", strict, stats
            )
        elif known is not None and str(label) not in known:
            message = f"label {label!r} is not one of the training labels {labels}"
            _reject(where, message, "unknown label", strict, stats)
        else:
            rows.append((text, label))
    if labels is None:
        labels = [str(x) for x in sorted({lab for _, lab in rows}, key=lambda x: (isinstance(x, str), x))]
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for text, label in rows:
        example = _fit(
            Example([tok.bos_id, *tok.encode(text)], index[str(label)]), seq_length, overlong, stats
        )
        if example is not None:
            examples.append(example)
            stats.used += 1
    return examples, stats, labels


# ---------------------------------------------------------------------------- sequences
def pack(examples: list[Example], seq_length: int, pad_id: int, packing: bool) -> list[Batch]:
    """SFT examples -> sequences of ``seq_length`` (greedy, in order; one example each without packing).
    ``labels[p]`` is the next token of the same example, trained where that token is a target."""
    sequences, current, used = [], [], 0
    for ex in examples:
        if current and (not packing or used + len(ex.tokens) > seq_length):
            sequences.append(_sequence(current, seq_length, pad_id))
            current, used = [], 0
        current.append(ex)
        used += len(ex.tokens)
    if current:
        sequences.append(_sequence(current, seq_length, pad_id))
    return sequences


def _sequence(examples: list[Example], seq_length: int, pad_id: int) -> Batch:
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.zeros(seq_length, dtype=torch.long)
    loss_mask = torch.zeros(seq_length)
    positions = torch.zeros(seq_length, dtype=torch.long)
    doc_ids = torch.full((seq_length,), -1, dtype=torch.long)
    start = 0
    for doc, ex in enumerate(examples):
        n = len(ex.tokens)
        ids = torch.tensor(ex.tokens)
        tokens[start : start + n] = ids
        labels[start : start + n - 1] = ids[1:]
        loss_mask[start : start + n - 1] = torch.tensor(ex.target[1:], dtype=torch.float)
        positions[start : start + n] = torch.arange(n)
        doc_ids[start : start + n] = doc
        start += n
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "positions": positions,
        "doc_ids": doc_ids,
    }


def classify_item(ex: Example, seq_length: int, pad_id: int, weight: float = 1.0) -> Batch:
    """One right-padded example; ``doc_ids`` -1 on padding marks where the head pools (last real token)."""
    n = len(ex.tokens)
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    tokens[:n] = torch.tensor(ex.tokens)
    doc_ids = torch.full((seq_length,), -1, dtype=torch.long)
    doc_ids[:n] = 0
    return {
        "tokens": tokens,
        "labels": torch.tensor(ex.target),
        "loss_mask": torch.tensor(weight),
        "positions": torch.arange(seq_length),
        "doc_ids": doc_ids,
    }


def empty_item(like: Batch) -> Batch:
    """A weight-0 filler with ``like``'s shapes (completes the last validation batch)."""
    item = {k: torch.zeros_like(v) for k, v in like.items()}
    item["doc_ids"] = torch.full_like(like["doc_ids"], -1)
    item["doc_ids"][..., 0] = 0  # one real position, so attention has something to attend to
    return item


def collate(items: list[Batch]) -> Batch:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def train_stream(
    items: list[Batch], consumed: int, mbs: int, gbs: int, dp_rank: int, dp: int, seed: int
) -> Iterator[Batch]:
    """This rank's micro-batches from global sample ``consumed`` on, epoch after epoch (a fresh
    permutation per epoch, seeded, so resume replays the same order)."""
    n, per_rank = len(items), gbs // dp
    perms: dict[int, torch.Tensor] = {}

    def item(g: int) -> Batch:
        epoch = g // n
        if epoch not in perms:
            perms.clear()
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        return items[int(perms[epoch][g % n])]

    g = consumed
    while True:
        mine = g + dp_rank * per_rank
        for start in range(0, per_rank, mbs):
            yield collate([item(mine + start + j) for j in range(mbs)])
        g += gbs


def valid_batches(items: list[Batch], mbs: int, dp_rank: int, dp: int, multiple: int = 1) -> list[Batch]:
    """Every validation item once: rank r takes items r, r+dp, ...; all ranks get the same number of
    micro-batches (a multiple of ``multiple``), completed with weight-0 fillers."""
    per_rank = math.ceil(len(items) / dp)
    batches = math.ceil(per_rank / mbs)
    batches = math.ceil(batches / multiple) * multiple
    mine = items[dp_rank::dp]
    mine = mine + [empty_item(items[0])] * (batches * mbs - len(mine))
    return [collate(mine[i : i + mbs]) for i in range(0, len(mine), mbs)]
