"""Fine-tuning data: JSONL readers (SFT prompt/response or chat messages; text classification; the
encoder's text/text-pair classification and word tagging), the chat template kept in the tokenizer
directory, packing, and epoch-wise micro-batch streams.

SFT examples are the ids ``apply_chat_template(messages, tokenize=True)`` gives on the exported tokenizer,
plus a mask of the tokens the model is trained to produce (assistant content and the end-of-turn token the
template puts after it); everything the user, system or template says is context only.
Packed sequences carry ``positions`` (restarting at 0 per example) and ``doc_ids`` (-1 on padding) so
attention and rotary positions never cross example boundaries.
"""

from __future__ import annotations

import glob
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bigtrain.data.corpus import DataError  # one class for bad data; callers also import it from here
from bigtrain.data.sampler import stack
from tokenizer.io import READ_FAILURES, ReadError, open_jsonl, read_failure

if TYPE_CHECKING:  # transformers is imported where used (seconds of import time)
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
# bigtrain's own template: BOS, then ``<|role|>`` headers; every assistant reply ends with EOS, which is
# what the model learns to stop on (the export's generation_config stops on it).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# What storing a template renders (and what finds a template's end-of-turn token): two turns with a system
# message, and without it for templates that refuse system messages.
SAMPLE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
)
# where transformers 5 saves a template; when present, it wins over tokenizer_config.json's
CHAT_TEMPLATE_FILE = "chat_template.jinja"
Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------- chat template
def template_file(tokenizer_dir: str | Path) -> Path:
    """The file transformers reads a directory's chat template from: ``chat_template.jinja`` when present,
    else ``tokenizer_config.json`` (its ``chat_template`` field)."""
    jinja = Path(tokenizer_dir) / CHAT_TEMPLATE_FILE
    return jinja if jinja.is_file() else Path(tokenizer_dir) / "tokenizer_config.json"


def stored_settings(tokenizer_dir: str | Path) -> dict[str, Any]:
    """Tokenizer settings :func:`save_chat_template` writes along with the template."""
    return {} if template_file(tokenizer_dir).name == CHAT_TEMPLATE_FILE else {"split_special_tokens": False}


def save_chat_template(tokenizer_dir: str | Path, template: str = DEFAULT_CHAT_TEMPLATE) -> Path:
    """Store ``template`` where ``AutoTokenizer.from_pretrained(tokenizer_dir)`` reads it (with
    :func:`stored_settings`); returns that file."""
    path = template_file(tokenizer_dir)
    if path.name == CHAT_TEMPLATE_FILE:
        path.write_text(template, encoding="utf-8")
        return path
    if not path.is_file():
        raise DataError(f"{tokenizer_dir}: no tokenizer_config.json (not a tokenizer directory)")
    config = json.loads(path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    # directories written before tokenizer.hf read special-token strings as tokens: with the flag on, the
    # template's {{ eos_token }} would be tokenized as the text "</s>" (the same in training and the export)
    config.update(stored_settings(tokenizer_dir))
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def template_record(chat: ChatTemplate) -> dict[str, Any]:
    """What an SFT checkpoint's metadata records of the template it was trained with (``chat_template``
    in bigtrain.json): the text, its sha256, the file it came from and the directory's tokenizer fingerprint
    (``tokenizer.Tokenizer.fingerprint``: the tokenizer.model sha256, or a Hugging Face tokenizer's). The
    export writes this text; a resume compares it."""
    import hashlib

    from tokenizer import Tokenizer, tokenizer_kind

    tokenizer = Tokenizer.load(chat.tokenizer_dir) if tokenizer_kind(chat.tokenizer_dir) else None
    return {
        "sha256": hashlib.sha256(chat.template.encode("utf-8")).hexdigest(),
        "source": chat.source,
        "tokenizer_fingerprint": None if tokenizer is None else tokenizer.fingerprint,
        "text": chat.template,
    }


def current_template(tokenizer_dir: str | Path) -> str | None:
    """The chat template ``AutoTokenizer.from_pretrained(tokenizer_dir)`` holds now (its ``default`` one
    when it has several), None when it has none; DataError when the directory does not load."""
    template = hf_tokenizer(tokenizer_dir).chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def hf_tokenizer(tokenizer_dir: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(tokenizer_dir)``: the files the HF export copies, so fine-tuning data
    is tokenized exactly as the exported model is served; DataError naming the directory if it cannot load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), **kwargs)
    except Exception as e:  # no or broken HF files
        raise DataError(
            f"{tokenizer_dir}: cannot load the Hugging Face tokenizer ({_one_line(e)}); fine-tuning "
            "needs the HF files tokenizer.train writes (tokenizer.json, tokenizer_config.json)"
        ) from None


class ChatTemplate:
    """A tokenizer directory's chat template, rendered and tokenized exactly as
    ``AutoTokenizer.from_pretrained(export).apply_chat_template(messages, tokenize=True)`` does on the
    exported files (the export copies this directory's tokenizer files).

    Rendering is transformers' own (``render_jinja_template``: its sandbox, ``raise_exception``,
    ``strftime_now``, ``tojson``, ``{% generation %}``) with the tokenizer's special tokens
    (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, ...) as variables; the whole rendered
    conversation is tokenized at once by the HF tokenizer without added BOS/EOS, special-token strings
    read as those tokens. ``template``: a template to use instead of the directory's, and ``hf_kwargs``
    tokenizer settings, as :func:`save_chat_template` will store them (to check a template before storing
    it). Raises :class:`DataError` naming the directory or the template file.
    """

    def __init__(
        self,
        tokenizer_dir: str | Path,
        template: str | None = None,
        source: str | None = None,
        **hf_kwargs: Any,
    ):
        from jinja2 import TemplateSyntaxError
        from transformers.utils import chat_template_utils

        # transformers' own compile (its environment and extensions); private in transformers 5.0-5.24.
        # Without it a syntax error surfaces, named, at the first render.
        compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)

        tokenizer_dir = self.tokenizer_dir = Path(tokenizer_dir)
        self.hf = hf_tokenizer(tokenizer_dir, **hf_kwargs)
        self.source = source or str(template_file(tokenizer_dir))
        if template is None:
            template = self.hf.chat_template
            if isinstance(template, dict):
                template = template.get("default")
        if not template:
            raise DataError(
                f"{tokenizer_dir}: no chat template (tokenizer_config.json has no 'chat_template'); add one with "
                f"python -m bigtrain.finetune.chat_template --tokenizer {tokenizer_dir} [--template FILE]"
            )
        try:
            if compile_template is not None:
                compile_template(template)
        except TemplateSyntaxError as e:
            raise DataError(
                f"{self.source}: chat template syntax error at template line {e.lineno}: {e.message}"
            ) from None
        self.template = template
        # what apply_chat_template passes (bos_token, ...)
        self.variables: dict[str, Any] = self.hf.special_tokens_map
        controls = sorted((t for t in self.hf.added_tokens_encoder if t.strip()), key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, controls)) or "(?!)")
        self._generation = re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else its EOS id (padding is never trained on)."""
        pad = self.hf.pad_token_id
        return pad if pad is not None else self.hf.eos_token_id

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The template's text for ``messages`` (``apply_chat_template(..., tokenize=False)``)."""
        return self._render(messages, add_generation_prompt)[0]

    def _render(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, spans: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and, when ``spans``, the character spans of its {% generation %} blocks."""
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            # transformers annotates the result as str, but it is (rendered texts, generation spans)
            rendered: tuple[list[str], list[list[tuple[int, int]]]] = render_jinja_template(  # type: ignore[assignment]
                conversations=[messages],
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=spans,
                **self.variables,
            )
        except TemplateError as e:
            if type(e) is TemplateError:  # raise_exception(...) in the template: it refuses this conversation
                raise Rejected(
                    f"chat template {self.source} refused it: {e}", "refused by the chat template"
                ) from None
            raise DataError(f"chat template {self.source}: {_one_line(e)}") from None
        except Exception as e:
            raise DataError(f"chat template {self.source}: {_one_line(e)}") from None
        texts, indices = rendered
        return texts[0], indices[0] if spans else []

    def encode(self, messages: list[dict[str, str]]) -> Example:
        """Token ids of the whole rendered conversation and which of them are trained: each assistant
        reply and the end-of-turn token the template puts after it (EOS, ``<|im_end|>``, ...), nothing else.

        A reply's text is what rendering ``messages[:i+1]`` adds to ``messages[:i]`` rendered with the
        generation prompt (what a server sends for turn i), up to the last special or added token in it
        (text after that, such as a newline, belongs to no reply). Templates with ``{% generation %}``
        blocks mark the trained text themselves, as ``return_assistant_tokens_mask`` uses them.
        A token is trained when its characters overlap a reply's.
        """
        text, spans = self._render(messages, False, spans=self._generation)
        if not self._generation:
            for i, message in enumerate(messages):
                if message["role"] == "assistant":
                    spans.append(self._reply_span(messages, i, text))
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        target = [any(s < b and max(e, s + 1) > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return Example(list(enc["input_ids"]), target)

    def _reply_span(self, messages: list[dict[str, str]], i: int, text: str) -> tuple[int, int]:
        try:
            prompt = self.render(messages[:i], add_generation_prompt=True)
        except (DataError, Rejected) as e:
            if i:
                raise
            raise Rejected(
                f"the assistant speaks first and the template renders no prompt for it ({e})",
                "refused by the chat template",
            ) from None
        turn = self.render(messages[: i + 1], add_generation_prompt=False)
        if not turn.startswith(prompt) or not text.startswith(turn):
            raise DataError(
                f"chat template {self.source} does not render a conversation as growing prefixes (message {i}: "
                "the prompt for a reply, the reply and the rest must extend one another); it cannot be trained "
                "as served"
            )
        ends = [m.end() for m in self._control.finditer(turn, len(prompt))]
        return len(prompt), ends[-1] if ends else len(turn)

    def check(self) -> Example:
        """Encode :data:`SAMPLE_CONVERSATION` (without its system message when the template refuses that);
        raises DataError naming the template when it cannot be rendered and trained."""
        try:
            return self.encode(list(SAMPLE_CONVERSATION))
        except Rejected:
            try:
                return self.encode(list(SAMPLE_CONVERSATION[1:]))
            except Rejected as e:
                raise DataError(f"{e} (a sample user/assistant conversation of two turns)") from None

    def end_of_turn_ids(self) -> list[int]:
        """Ids of the special/added tokens that end the sample's assistant replies (what generation should
        stop on), in order of appearance; empty when the template ends replies with none."""
        example, ids = self.check(), []
        trained = example.trained
        control = {self.hf.convert_tokens_to_ids(t) for t in self.hf.added_tokens_encoder}
        for p, token in enumerate(example.tokens):
            ends_reply = trained[p] and (p + 1 == len(example.tokens) or not trained[p + 1])
            if ends_reply and token in control and token not in ids:
                ids.append(token)
        return ids

    def describe(self) -> str:
        """One start-up line: where the template is from and what replies end with."""
        ids = self.end_of_turn_ids()
        if not ids:
            split = " (split_special_tokens is on: special-token strings are read as text)"
            return (
                f"chat template {self.source}: warning: assistant replies end with no special token"
                f"{split if self.hf.split_special_tokens else ''}, so the model does not learn to stop; store a "
                "template that emits eos_token after each reply (e.g. bigtrain's default: "
                "python -m bigtrain.finetune.chat_template --tokenizer DIR)"
            )
        names = ", ".join(f"{self.hf.convert_ids_to_tokens(i)} (id {i})" for i in ids)
        return f"chat template {self.source}: assistant replies end with {names}"


# ---------------------------------------------------------------------------- reading
@dataclass
class Example:
    tokens: list[int]
    target: list[bool] | int  # sft: which tokens are trained; classify: the class id

    @property
    def trained(self) -> list[bool]:
        """An SFT example's per-token target mask; TypeError on a classification example."""
        if not isinstance(self.target, list):
            raise TypeError(f"a classification example (class {self.target}) has no per-token targets")
        return self.target


@dataclass
class ReadStats:
    lines: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> lines
    truncated: int = 0
    dropped: int = 0  # over-long examples dropped (finetune.overlong=drop, or nothing left to train)
    read_errors: list[ReadError] = field(default_factory=list)  # files that failed part way (not strict)

    def summary(self, name: str) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        unreadable = "".join(f"; {e.describe('record')}" for e in self.read_errors)
        return (
            f"{name}: {self.lines} lines, {self.used} examples used; over-long: {self.truncated} truncated, "
            f"{self.dropped} dropped; skipped: {skipped}{unreadable}"
        )


def expand_paths(spec: Any, key: str) -> list[Path]:
    """A path, a glob, or a list of them -> existing files (sorted per pattern; a glob's directories left
    out, a directory given by name is an error)."""
    items = spec if isinstance(spec, list) else [spec]
    files: list[Path] = []
    for item in items:
        if not glob.has_magic(str(item)) and Path(item).is_dir():
            raise DataError(
                f"{key}: {item} is a directory, not a file (give its files, e.g. '{item}/*.jsonl')"
            )
        matches = sorted(m for m in glob.glob(str(item)) if not Path(m).is_dir())
        if not matches:
            raise DataError(f"{key}: {item} matches no file")
        files += [Path(m) for m in matches]
    return files


def _records(files: list[Path], strict: bool, stats: ReadStats) -> Iterator[tuple[str, dict]]:
    """``(file:line, object)`` of every JSON-object line, read as tokenizer.io reads pretraining JSONL
    (``.jsonl.gz``/``.bz2``/``.xz`` decompressed by name). A bad line (not UTF-8, malformed JSON) is counted
    or, ``strict``, raised; a file that fails part way keeps the records before the failure and goes to
    ``stats.read_errors`` (``strict``: DataError naming file:line)."""
    for path in files:
        number, kept = 0, 0
        try:
            with open_jsonl(path) as f:
                for number, raw in enumerate(f, 1):
                    where = f"{path}:{number}"
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        stats.lines += 1
                        message = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                        _reject(where, message, "invalid UTF-8", strict, stats)
                        continue
                    if not line.strip():
                        continue
                    stats.lines += 1
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as e:
                        _reject(where, f"malformed JSON ({e})", "malformed", strict, stats)
                        continue
                    kept += 1
                    yield where, record
        except READ_FAILURES as e:
            error = ReadError(path, number + 1, read_failure(e), kept)
            if strict:
                raise DataError(f"{error.where}: unreadable ({error.detail})") from None
            stats.read_errors.append(error)


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


def read_sft(
    spec: Any, key: str, chat: ChatTemplate, seq_length: int, overlong: str, strict: bool
) -> tuple[list[Example], ReadStats]:
    """SFT examples of JSONL files as ``chat`` renders and tokenizes them (see :meth:`ChatTemplate.encode`).
    Lines the template refuses (``raise_exception``) are skipped and counted like other bad lines; a template
    that fails (undefined variable, ...) raises DataError naming it and the line."""
    stats, examples = ReadStats(), list[Example]()
    for where, record in _records(expand_paths(spec, key), strict, stats):
        try:
            example = chat.encode(_messages(record))
        except Rejected as e:
            _reject(where, str(e), e.reason, strict, stats)
            continue
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        fitted = _fit(example, seq_length, overlong, stats)
        if fitted is not None:
            examples.append(fitted)
            stats.used += 1
    return examples, stats


def read_classify(
    spec: Any,
    key: str,
    tok: PreTrainedTokenizerBase,
    seq_length: int,
    overlong: str,
    strict: bool,
    labels: list[str] | None,
) -> tuple[list[Example], ReadStats, list[str]]:
    """``tok``: the HF tokenizer (:func:`hf_tokenizer`); a text's ids are ``tok(text)["input_ids"]``, what the
    exported classifier is given (BOS as the tokenizer adds it). ``labels``: the class names (None: taken
    from this data, sorted; ints numerically)."""
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
        labels = _sorted_labels([lab for _, lab in rows])
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for text, label in rows:
        example = _fit(Example(tok(text)["input_ids"], index[str(label)]), seq_length, overlong, stats)
        if example is not None:
            examples.append(example)
            stats.used += 1
    return examples, stats, labels


# ---------------------------------------------------------------------------- the encoder (bert)
@dataclass
class Specials:
    """The encoder's special token ids: ``[CLS]`` opens a sequence, ``[SEP]`` ends each segment, padding
    (masked out of attention, so any id does) is the tokenizer's pad token."""

    cls: int
    sep: int
    pad: int

    @classmethod
    def of(cls, tokenizer_dir: str | Path) -> Specials:
        """The ids bigtrain's :class:`tokenizer.Tokenizer` of ``tokenizer_dir`` gives (those the bert
        pretraining data uses); DataError naming the directory and the missing tokens."""
        from tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer_dir)
        if tok.cls_id is None or tok.sep_id is None:
            missing = [name for name, i in (("[CLS]", tok.cls_id), ("[SEP]", tok.sep_id)) if i is None]
            raise DataError(
                f"{tokenizer_dir}: the tokenizer has no {' '.join(missing)} token; the bert family's inputs are "
                "[CLS] A [SEP] (B [SEP]): train the tokenizer with python -m tokenizer.train --bert-specials"
            )
        return cls(tok.cls_id, tok.sep_id, tok.pad_id if tok.pad_id >= 0 else 0)


@dataclass
class EncoderExample:
    """One encoder input: ``[CLS] A [SEP] (B [SEP])`` ids, token types (0: A and its specials, 1: B and
    its [SEP]), and the target: a class id (classify) or a tag id per token (-1: not trained)."""

    tokens: list[int]
    token_types: list[int]
    target: int | list[int]


def _truncate_longest_first(a: list, b: list | None, budget: int) -> tuple[list, list | None]:
    """Cut the segments' ends to ``budget`` tokens in all, as HF tokenizers' ``truncation="longest_first"``
    does: the shorter segment stays whole when the longer one can give up enough, else both keep half the
    budget, the longer one (B on equal lengths) the odd token."""
    if b is None:
        return a[:budget], None
    if len(a) + len(b) <= budget:
        return a, b
    a_longer = len(a) > len(b)
    short = min(len(a), len(b))
    keep_short, keep_long = short, max(short, budget - short)
    if keep_short + keep_long > budget:
        keep_short = budget // 2
        keep_long = keep_short + budget % 2
    keep_a, keep_b = (keep_long, keep_short) if a_longer else (keep_short, keep_long)
    return a[:keep_a], b[:keep_b]


def encode_pair(
    a: list[int], b: list[int] | None, specials: Specials, seq_length: int, overlong: str, stats: ReadStats
) -> tuple[list[int], list[int]] | None:
    """(ids, token types) of ``[CLS] a [SEP] (b [SEP])`` in ``seq_length`` tokens: an over-long input is
    truncated longest-first (``overlong`` truncate) or dropped (drop; None), counted in ``stats``."""
    budget = seq_length - (3 if b is not None else 2)
    if len(a) + (len(b) if b is not None else 0) > budget:
        if overlong == "drop":
            stats.dropped += 1
            return None
        stats.truncated += 1
        a, b = _truncate_longest_first(a, b, budget)
    ids = [specials.cls, *a, specials.sep]
    types = [0] * len(ids)
    if b is not None:
        ids += [*b, specials.sep]
        types += [1] * (len(b) + 1)
    return ids, types


TEXT_KEYS = "'text' (and 'text_pair' for sentence pairs) and 'label'"


def read_classify_pairs(
    spec: Any,
    key: str,
    tok: PreTrainedTokenizerBase,
    specials: Specials,
    seq_length: int,
    overlong: str,
    strict: bool,
    labels: list[str] | None,
) -> tuple[list[EncoderExample], ReadStats, list[str]]:
    """The encoder's classification examples of JSONL records ``{"text", "label"}`` or ``{"text",
    "text_pair", "label"}``: ``[CLS] text [SEP] (text_pair [SEP])``, each text's ids
    ``tok(text, add_special_tokens=False)``. ``labels`` as :func:`read_classify`."""
    stats, rows = ReadStats(), []
    known = None if labels is None else set(labels)
    for where, record in _records(expand_paths(spec, key), strict, stats):
        text, pair, label = record.get("text"), record.get("text_pair"), record.get("label")
        if not isinstance(text, str) or not text.strip():
            _reject(
                where,
                f"expected a non-empty string field 'text' (keys: {TEXT_KEYS})",
                "malformed",
                strict,
                stats,
            )
        elif "text_pair" in record and (not isinstance(pair, str) or not pair.strip()):
            _reject(
                where,
                f"'text_pair' must be a non-empty string (keys: {TEXT_KEYS})",
                "malformed",
                strict,
                stats,
            )
        elif not isinstance(label, (str, int)) or isinstance(label, bool):
            message = f"'label' must be a string or an integer, got {label!r} (keys: {TEXT_KEYS})"
            _reject(where, message, "malformed", strict, stats)
        elif known is not None and str(label) not in known:
            _reject(
                where,
                f"label {label!r} is not one of the training labels {labels}",
                "unknown label",
                strict,
                stats,
            )
        else:
            rows.append((text, pair, label))
    if labels is None:
        labels = _sorted_labels([lab for _, _, lab in rows])
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for text, pair, label in rows:
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = None if pair is None else tok(pair, add_special_tokens=False)["input_ids"]
        encoded = encode_pair(a, b, specials, seq_length, overlong, stats)
        if encoded is not None:
            examples.append(EncoderExample(*encoded, index[str(label)]))
            stats.used += 1
    return examples, stats, labels


def _sorted_labels(found: list) -> list[str]:
    """Class names of the data: sorted, integers numerically and before strings."""
    return [str(x) for x in sorted(set(found), key=lambda x: (isinstance(x, str), x))]


def tag_error(tag: Any) -> str | None:
    """Why ``tag`` is not an IOB2 tag (``O``, ``B-TYPE``, ``I-TYPE``), or None."""
    if not isinstance(tag, str):
        return f"tag {tag!r} is not a string"
    if tag == "O" or (tag[:2] in ("B-", "I-") and tag[2:]):
        return None
    return f"tag {tag!r} is not an IOB2 tag (O, B-TYPE or I-TYPE)"


TAG_KEYS = "'tokens' (a list of words) and 'tags' (one IOB2 tag per word)"


def read_token_classify(
    spec: Any,
    key: str,
    tok: PreTrainedTokenizerBase,
    specials: Specials,
    seq_length: int,
    overlong: str,
    strict: bool,
    labels: list[str] | None,
) -> tuple[list[EncoderExample], ReadStats, list[str]]:
    """Token-classification examples of JSONL records ``{"tokens": [words], "tags": [IOB2 tags]}``: the
    words' pieces as ``tok(words, is_split_into_words=True, add_special_tokens=False)`` gives them (what
    HF's token-classification pipelines align by ``word_ids``), in ``[CLS] ... [SEP]``; the first piece of
    each word carries its tag, other pieces and the specials are not trained (-1). An over-long sequence
    loses its last pieces (``overlong`` truncate; the words cut off are not trained) or is dropped.
    ``labels``: the tag set (None: the data's tags, sorted, ``O`` first)."""
    stats, rows = ReadStats(), list[tuple[str, list[str], list[str]]]()
    known = None if labels is None else set(labels)
    for where, record in _records(expand_paths(spec, key), strict, stats):
        words, tags = record.get("tokens"), record.get("tags")
        problem: str | None = None
        if (
            not isinstance(words, list)
            or not words
            or not all(isinstance(w, str) and w.strip() for w in words)
        ):
            problem = f"'tokens' must be a non-empty list of non-empty strings (keys: {TAG_KEYS})"
        elif not isinstance(tags, list) or len(tags) != len(words):
            problem = f"'tags' must be a list as long as 'tokens' ({len(words)}) (keys: {TAG_KEYS})"
        else:
            problem = next((e for e in map(tag_error, tags) if e is not None), None)
        if problem is not None or words is None or tags is None:
            _reject(where, problem or "", "malformed", strict, stats)
        elif known is not None and not known.issuperset(tags):
            unknown = sorted(set(tags) - known)
            _reject(
                where, f"tags {unknown} are not in finetune.labels {labels}", "unknown label", strict, stats
            )
        else:
            rows.append((where, words, tags))
    if labels is None:
        found = {t for _, _, tags in rows for t in tags}
        labels = sorted(found, key=lambda t: (t != "O", t[2:], t[:2]))  # O, then B-/I- per type
    else:
        bad = next((e for e in map(tag_error, labels) if e is not None), None)
        if bad is not None:
            raise DataError(f"finetune.labels: {bad}")
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for where, words, tags in rows:
        enc = tok(words, is_split_into_words=True, add_special_tokens=False)
        word_ids = enc.word_ids()
        if set(w for w in word_ids if w is not None) != set(range(len(words))):
            missing = sorted(set(range(len(words))) - set(word_ids))
            _reject(where, f"words {missing} give no token", "malformed", strict, stats)
            continue
        ids, target, previous = [specials.cls], [-1], None
        for piece, word in zip(enc["input_ids"], word_ids):
            ids.append(piece)
            target.append(index[tags[word]] if word is not None and word != previous else -1)
            previous = word
        if len(ids) + 1 > seq_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            ids, target = ids[: seq_length - 1], target[: seq_length - 1]
        ids.append(specials.sep)
        target.append(-1)
        examples.append(EncoderExample(ids, [0] * len(ids), target))
        stats.used += 1
    return examples, stats, labels


def encoder_item(ex: EncoderExample, seq_length: int, pad_id: int, weight: float = 1.0) -> Batch:
    """One right-padded encoder input: tokens, token_types, attention_mask [s] (1: a real token) and the
    targets: classify ``labels`` [] and ``loss_mask`` [] (the example's weight); token_classify ``labels``
    [s] (0 where not trained) and ``loss_mask`` [s] (1 on the first piece of each word)."""
    n = len(ex.tokens)
    tokens = torch.full((seq_length,), pad_id, dtype=torch.long)
    tokens[:n] = torch.tensor(ex.tokens)
    types = torch.zeros(seq_length, dtype=torch.long)
    types[:n] = torch.tensor(ex.token_types)
    mask = torch.zeros(seq_length, dtype=torch.long)
    mask[:n] = 1
    item = {"tokens": tokens, "token_types": types, "attention_mask": mask}
    if isinstance(ex.target, int):
        return {**item, "labels": torch.tensor(ex.target), "loss_mask": torch.tensor(weight)}
    target = torch.full((seq_length,), -1, dtype=torch.long)
    target[:n] = torch.tensor(ex.target)
    return {**item, "labels": target.clamp(min=0), "loss_mask": (target >= 0).float() * weight}


# ---------------------------------------------------------------------------- sequences
def pack(examples: list[Example], seq_length: int, pad_id: int, packing: bool) -> list[Batch]:
    """SFT examples -> sequences of ``seq_length`` (greedy, in order; one example each without packing).
    ``labels[p]`` is the next token of the same example, trained where that token is a target."""
    sequences: list[Batch] = []
    current: list[Example] = []
    used = 0
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
        loss_mask[start : start + n - 1] = torch.tensor(ex.trained[1:], dtype=torch.float)
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
    # one real position, so attention has something to attend to
    if "attention_mask" in item:  # the encoder
        item["attention_mask"][..., 0] = 1
    else:
        item["doc_ids"] = torch.full_like(like["doc_ids"], -1)
        item["doc_ids"][..., 0] = 0
    return item


def collate(items: list[Batch]) -> Batch:
    """Items of one shape stacked key by key into a micro-batch ``{key: [len(items), ...]}``."""
    return stack(items)


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
