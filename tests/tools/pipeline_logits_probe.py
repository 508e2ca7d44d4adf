"""``torchrun --nproc_per_node N -m tests.tools.pipeline_logits_probe --tokens T.pt --checkpoint A --output
A.pt [--checkpoint B --output B.pt ...]``: bigtrain's own LM logits [b, s, vocab] (vocab shards
gathered, padding stripped) for the tokens [b, s] in T.pt, at the tensor x pipeline layout every listed
checkpoint was saved with (all the same layout: one process group serves them all). Each pipeline stage
runs its ``PipelineModule`` layers and sends the hidden state to the next stage's rank of the same
tensor rank (pipeline 1: sequence parallelism allowed, as MoE imports at TP > 1 have it). A test probe
(what imports are compared against); data parallel = 1."""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", required=True, help="a torch file holding token ids [b, s]")
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--output", action="append", required=True, help="one per --checkpoint")
    args = parser.parse_args(argv)

    from megatron.core import parallel_state

    from bigtrain.checkpoint import WeightReader, load_weights_only
    from bigtrain.config import config_from_dict
    from bigtrain.distributed import init_distributed, shutdown, world_size_from_env
    from bigtrain.registry import build_model

    cfgs = []
    for path in args.checkpoint:
        cfg = config_from_dict(WeightReader(path).meta["config"])
        cfg.checkpoint.load, cfg.train.device = None, "cpu"
        cfgs.append(cfg.resolve(world_size_from_env()))
    dist = init_distributed(cfgs[0])
    topo = dist.topology
    tokens = torch.load(args.tokens)
    try:
        for cfg, path, output in zip(cfgs, args.checkpoint, args.output):
            model = build_model(cfg, dist.topology)
            load_weights_only(model, cfg, path)
            model.eval()
            last = cfg.parallel.pipeline - 1
            with torch.no_grad():
                x = tokens
                if dist.pp_rank > 0:  # hidden [s, b, h] from the previous stage
                    x = torch.empty(tokens.shape[1], tokens.shape[0], cfg.model.hidden_size)
                    torch.distributed.recv(
                        x, src=topo.get_rank(pipe=dist.pp_rank - 1, data=0, model=dist.tp_rank)
                    )
                # this stage's layers; one stage (a LlamaModel): its logits, sequence shards gathered
                y = model(x) if cfg.parallel.pipeline > 1 else model.outputs(x)
                if dist.pp_rank < last:
                    torch.distributed.send(
                        y.contiguous(), dst=topo.get_rank(pipe=dist.pp_rank + 1, data=0, model=dist.tp_rank)
                    )
                    continue
                shards = [torch.empty_like(y) for _ in range(cfg.parallel.tensor)]  # [s, b, v/tp] each
                torch.distributed.all_gather(
                    shards, y, group=parallel_state.get_tensor_model_parallel_group()
                )
            if dist.tp_rank == 0:
                logits = torch.cat(shards, dim=-1)[..., : cfg.model.vocab_size].transpose(0, 1)
                torch.save(logits.float().contiguous(), output)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
