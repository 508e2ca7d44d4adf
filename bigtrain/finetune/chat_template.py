"""``python -m bigtrain.finetune.chat_template --tokenizer DIR [--template FILE]``: store a Jinja chat
template in a tokenizer directory (tokenizer_config.json), where SFT reads it and the HF export copies it.
Without --template, bigtrain's default (``<|role|>`` headers, no special tokens) is written."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bigtrain.finetune.data import DEFAULT_CHAT_TEMPLATE, ChatTemplate, save_chat_template


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--tokenizer", required=True, help="tokenizer directory (python -m tokenizer.train output)"
    )
    parser.add_argument("--template", help="Jinja template file (default: bigtrain's)")
    args = parser.parse_args(argv)
    template = Path(args.template).read_text() if args.template else DEFAULT_CHAT_TEMPLATE
    try:
        ChatTemplate(template).render([{"role": "user", "content": "x"}], add_generation_prompt=True)
        save_chat_template(args.tokenizer, template)
    except Exception as e:  # a template that does not render is reported, not stored
        print(f"chat_template: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"chat template stored in {Path(args.tokenizer) / 'tokenizer_config.json'}")


if __name__ == "__main__":
    main()
