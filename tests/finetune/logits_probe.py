"""``[torchrun --nproc_per_node N] python -m tests.finetune.logits_probe --checkpoint DIR --tokens 1,2,3
--output logits.pt``: bigtrain's own outputs for token sequences at the layout the checkpoint was saved
with (tensor-parallel LoRA adapters included): LM logits [b, s, vocab] (vocab shards gathered, padding
stripped) or class logits [b, labels]. What exports are compared against (a test probe); pipeline = 1 only."""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="a fine-tuning checkpoint (tag dir, checkpoints dir, best)"
    )
    parser.add_argument(
        "--tokens", action="append", required=True, help="comma-separated ids, one sequence each"
    )
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    from megatron.core import parallel_state

    from bigtrain.checkpoint import WeightReader, load_weights_only
    from bigtrain.config import config_from_dict
    from bigtrain.distributed import init_distributed, shutdown, world_size_from_env
    from bigtrain.registry import build_model

    cfg = config_from_dict(WeightReader(args.checkpoint).meta["config"])
    cfg.checkpoint.load, cfg.train.device = None, "cpu"
    cfg.resolve(world_size_from_env())
    if cfg.parallel.pipeline != 1:
        raise SystemExit("tests.finetune.logits_probe: pipeline = 1 checkpoints only")
    dist = init_distributed(cfg)
    try:
        model = build_model(cfg, dist.topology)
        load_weights_only(model, cfg, args.checkpoint)
        model.eval()
        seqs = [[int(t) for t in s.split(",")] for s in args.tokens]
        tokens = torch.tensor(seqs)  # [b, s] (sequences of one length)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            out = model.outputs(tokens, positions, torch.zeros_like(tokens))
            if cfg.finetune.task == "sft":  # [s, b, v/tp] -> [b, s, vocab] (megatron's gather wants CUDA)
                shards = [torch.empty_like(out) for _ in range(cfg.parallel.tensor)]
                torch.distributed.all_gather(
                    shards, out, group=parallel_state.get_tensor_model_parallel_group()
                )
                out = torch.cat(shards, dim=-1)[..., : cfg.model.vocab_size].transpose(0, 1)
        if dist.rank == 0:
            torch.save(out.float().contiguous(), args.output)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
