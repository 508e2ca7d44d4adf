"""Generate text from a bigtrain checkpoint or a Hugging Face directory (single process, KV cache).

    python tools/generate.py --checkpoint RUN_DIR/checkpoints [--tag TAG] --prompt "def main(" --greedy
    python tools/generate.py --hf HF_DIR --prompt "..." --temperature 0.8 --top-p 0.95

``--checkpoint`` runs bigtrain's own model code (``bigtrain.generation``: bigtrain's layers at tensor
size 1 with a KV cache; a checkpoint of any layout is merged through the layout table). ``--hf`` runs
transformers' ``generate``. Comparing the two on a checkpoint and its export is the conversion check.

``--prompt-ids 1,17,42`` feeds token ids instead of text (checkpoints trained without a tokenizer);
``--chat`` sends the prompt as one user message through the tokenizer's chat template with the generation
prompt (the ids ``apply_chat_template(..., add_generation_prompt=True)`` gives, what SFT trained on).
Both sources stop on the ids the export's generation_config lists: EOS and the token the chat template
ends replies with; ``--json`` prints ``{"prompt_ids", "new_ids", "text"}``
instead of the text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def parse_ids(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def from_checkpoint(args: argparse.Namespace) -> tuple[list[int], list[int], str | None]:
    from bigtrain.generation import NativeModel
    from tokenizer import Tokenizer, tokenizer_kind

    path = Path(args.checkpoint) / args.tag if args.tag else Path(args.checkpoint)
    try:
        native = NativeModel.from_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"generate: {e}") from None
    with native as model:
        tok = stop = None
        tok_dir = model.cfg.data.tokenizer
        if tok_dir and tokenizer_kind(tok_dir) is not None:  # tokenizer.model or an HF tokenizer.json
            from tools.convert_to_hf import stop_ids

            tok = Tokenizer.load(tok_dir)
            eos_id = tok.eos_id if tok.eos_id >= 0 else None
            stop = stop_ids(Path(tok_dir), eos_id)  # what the export's generation_config stops on
        if args.prompt_ids is not None:
            prompt_ids = parse_ids(args.prompt_ids)
        elif tok is None:
            raise SystemExit(
                "generate: the checkpoint's config has no usable data.tokenizer; pass --prompt-ids"
            )
        elif args.chat:
            from bigtrain.finetune.data import ChatTemplate, DataError

            try:
                chat = ChatTemplate(tok_dir)
            except DataError as e:
                raise SystemExit(f"generate: --chat: {e}") from None
            prompt_ids = chat_ids(chat.hf, args.prompt)
        else:
            prompt_ids = tok.encode_as_hf(args.prompt)  # BOS as the export's tokenizer adds it
        eos = None if args.ignore_eos else stop
        new = model.generate(
            prompt_ids, args.max_new_tokens, args.greedy, args.temperature, args.top_p, eos, args.seed
        )
    return prompt_ids, new, None if tok is None else tok.decode(new)


def chat_ids(hf_tokenizer, prompt: str) -> list[int]:
    """``prompt`` as a user message with the generation prompt, as a chat server sends it."""
    messages = [{"role": "user", "content": prompt}]
    return hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


@torch.no_grad()
def from_hf(args: argparse.Namespace) -> tuple[list[int], list[int], str | None]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if AutoConfig.from_pretrained(args.hf).model_type == "bert":
        raise SystemExit(
            f"generate: {args.hf} is a BERT encoder, which does not generate text (use fill-mask)"
        )
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    tok = None
    if any(
        (Path(args.hf) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        tok = AutoTokenizer.from_pretrained(args.hf)
    if args.prompt_ids is not None:
        prompt_ids = parse_ids(args.prompt_ids)
    elif tok is None:
        raise SystemExit(f"generate: {args.hf} has no tokenizer files; pass --prompt-ids")
    elif args.chat:
        if not tok.chat_template:
            raise SystemExit(f"generate: --chat: {args.hf} has no chat template")
        prompt_ids = chat_ids(tok, args.prompt)  # generation_config's eos ids include the end-of-turn token
    else:
        prompt_ids = tok(args.prompt)["input_ids"]
    gen = model.generation_config
    if args.ignore_eos:
        gen.eos_token_id = None
    gen.pad_token_id = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
    sampling = {"do_sample": False} if args.greedy else {"do_sample": True, "temperature": args.temperature}
    if not args.greedy:
        sampling["top_p"] = args.top_p
    torch.manual_seed(args.seed)
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=args.max_new_tokens,
        use_cache=True,
        generation_config=gen,
        **sampling,
    )
    new = out[0, len(prompt_ids) :].tolist()
    return prompt_ids, new, None if tok is None else tok.decode(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="RUN_DIR/checkpoints (latest) or a step directory")
    src.add_argument("--hf", help="Hugging Face model directory")
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt",
        help="prompt text (encoded as the exported tokenizer encodes it: with BOS where it adds one)",
    )
    prompt.add_argument("--prompt-ids", help="prompt token ids, e.g. 1,17,42 (no tokenizer needed)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    parser.add_argument("--json", action="store_true", help="print prompt ids, new ids and text as JSON")
    parser.add_argument(
        "--chat", action="store_true", help="send --prompt as a user message through the chat template"
    )
    args = parser.parse_args(argv)
    if args.tag and not args.checkpoint:
        parser.error("--tag needs --checkpoint")
    if args.chat and args.prompt is None:
        parser.error("--chat needs --prompt")

    prompt_ids, new, text = from_checkpoint(args) if args.checkpoint else from_hf(args)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "new_ids": new, "text": text}))
    elif text is None:
        print(" ".join(map(str, new)))
    else:
        print((args.prompt or "") + text)


if __name__ == "__main__":
    main()
