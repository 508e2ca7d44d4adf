"""Generate text from a bigtrain checkpoint or a Hugging Face directory (single process, KV cache).

    python tools/generate.py --checkpoint RUN_DIR/checkpoints [--tag TAG] --prompt "def main(" [--greedy]
    python tools/generate.py --hf HF_DIR --prompt "..." --temperature 0.8 --top-p 0.95

A bigtrain checkpoint is merged in memory through the same layout table the exporter uses and run
as transformers' ``LlamaForCausalLM`` (its KV-cached ``generate``), so what you sample here is what
the exported model will produce.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def model_from_checkpoint(path: str | Path):
    """(LlamaForCausalLM, tokenizer-or-None, bigtrain config) from a bigtrain checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bigtrain.checkpoint import WeightReader
    from tools.convert_to_hf import checkpoint_config, hf_config, hf_tensors

    reader = WeightReader(path)
    cfg = checkpoint_config(reader)
    model = LlamaForCausalLM(LlamaConfig(**hf_config(cfg, "fp32")))
    state = dict(hf_tensors(reader, cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.model.tie_embeddings else set()):
        raise RuntimeError(f"checkpoint/model mismatch: missing {missing}, unexpected {unexpected}")
    tok = None
    if cfg.data.tokenizer and (Path(cfg.data.tokenizer) / "tokenizer.model").is_file():
        from tokenizer import Tokenizer

        tok = Tokenizer.load(cfg.data.tokenizer)
    return model.eval(), tok, cfg


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, greedy: bool, temperature: float, top_p: float,
                 eos_id: int | None, seed: int = 0) -> list[int]:
    torch.manual_seed(seed)
    kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
        **kwargs,
    )
    return out[0, len(prompt_ids) :].tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="RUN_DIR/checkpoints (latest) or a step directory")
    src.add_argument("--hf", help="Hugging Face model directory")
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    args = parser.parse_args(argv)

    if args.hf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32).eval()
        hf_tok = AutoTokenizer.from_pretrained(args.hf)
        prompt_ids = hf_tok(args.prompt)["input_ids"]
        decode, eos = hf_tok.decode, hf_tok.eos_token_id
    else:
        path = Path(args.checkpoint) / args.tag if args.tag else Path(args.checkpoint)
        model, tok, _ = model_from_checkpoint(path)
        if tok is None:
            raise SystemExit("generate: the checkpoint's config has no data.tokenizer; pass --hf on an export")
        prompt_ids = tok.encode(args.prompt, add_bos=True)
        decode, eos = tok.decode, tok.eos_id
    new = generate_ids(
        model, prompt_ids, args.max_new_tokens, args.greedy, args.temperature, args.top_p,
        None if args.ignore_eos else eos, args.seed,
    )
    print(args.prompt + decode(new))


if __name__ == "__main__":
    main()
