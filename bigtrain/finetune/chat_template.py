"""``python -m bigtrain.finetune.chat_template --tokenizer DIR [--template FILE]``: store a Jinja chat
template in a tokenizer directory, where SFT reads it and the HF export copies it (``chat_template.jinja``
when the directory has one, else ``tokenizer_config.json``: where transformers reads it).

Before anything is written, the template renders and tokenizes a sample conversation (system, user,
assistant, two turns; without the system message when the template refuses one) exactly as fine-tuning
will: transformers' chat-template environment with the tokenizer's special tokens. A template that fails
is refused, naming it (exit 2). Without --template, bigtrain's default is stored: ``<|role|>`` headers,
BOS first and EOS after every assistant reply."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bigtrain.checkpoint_files import read_manifest
from bigtrain.finetune.data import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    DataError,
    save_chat_template,
    stored_settings,
    template_file,
)


def checkpoint_holding(path: Path) -> Path | None:
    """The checkpoint whose manifest checksums ``path`` (a tokenizer imported into a checkpoint):
    changing the file would make the checkpoint fail verification."""
    path = path.resolve()
    for parent in path.parents:
        try:
            if path.relative_to(parent).as_posix() in read_manifest(parent):
                return parent
        except ValueError:  # no (readable) manifest here
            continue
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokenizer", required=True, help="tokenizer directory (python -m tokenizer.train output)"
    )
    parser.add_argument("--template", help="Jinja template file (default: bigtrain's)")
    args = parser.parse_args(argv)
    source = args.template or "bigtrain's default chat template"
    try:
        template = Path(args.template).read_text(encoding="utf-8") if args.template else DEFAULT_CHAT_TEMPLATE
        chat = ChatTemplate(args.tokenizer, template, source, **stored_settings(args.tokenizer))
        chat.check()
        described = chat.describe()
        target = template_file(args.tokenizer)
        if (checkpoint := checkpoint_holding(target)) is not None:
            raise DataError(
                f"{target} belongs to checkpoint {checkpoint} (its manifest checksums it); copy the tokenizer "
                f"directory (cp -r {args.tokenizer} data/tokenizer), store the template there and set "
                "data.tokenizer to it"
            )
        stored = save_chat_template(args.tokenizer, template)
    except (DataError, OSError) as e:
        print(f"chat_template: not stored: {e}", file=sys.stderr)
        sys.exit(2)
    print(described)
    print(f"chat template stored in {stored}")


if __name__ == "__main__":
    main()
