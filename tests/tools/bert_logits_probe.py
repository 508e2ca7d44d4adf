"""``torchrun --nproc_per_node N -m tests.tools.bert_logits_probe --inputs IN.pt --checkpoint CKPT --output
OUT.pt``: bigtrain's bert pretraining outputs for the inputs in IN.pt (``tokens``, ``token_types``,
``attention_mask``, [b, s] each) at the tensor x pipeline layout CKPT was saved with: ``{"mlm": [b, s, vocab]
(vocab shards gathered, padding stripped), "nsp": [b, 2]}``. Each pipeline stage runs its
``PipelineModule`` layers and sends the tuple between layers, ``(hidden [s, b, h], attention_mask [b, s])``
before the pooler and ``(hidden, pooled [b, h])`` after it, to the next stage's rank of the same tensor
rank. A test probe (what imports are compared against; the decoder's is ``pipeline_logits_probe``);
data parallel = 1."""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", required=True, help="a torch file: {tokens, token_types, attention_mask}")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    from megatron.core import parallel_state

    from bigtrain.checkpoint import WeightReader, load_weights_only
    from bigtrain.config import config_from_dict
    from bigtrain.distributed import init_distributed, shutdown, world_size_from_env
    from bigtrain.registry import build_model

    cfg = config_from_dict(WeightReader(args.checkpoint).meta["config"])
    cfg.checkpoint.load, cfg.train.device = None, "cpu"
    cfg = cfg.resolve(world_size_from_env())
    m = cfg.model
    dist = init_distributed(cfg)
    topo = dist.topology
    inputs = torch.load(args.inputs)
    tokens = inputs["tokens"]
    b, s = tokens.shape
    try:
        model = build_model(cfg, topo)
        load_weights_only(model, cfg, args.checkpoint)
        model.eval()
        with torch.no_grad():
            if cfg.parallel.pipeline == 1:
                outputs = model.outputs(tokens, inputs["token_types"], inputs["attention_mask"])
            else:
                x: tuple[torch.Tensor, ...] = (tokens, inputs["token_types"], inputs["attention_mask"])
                if dist.pp_rank > 0:  # the previous stage's last layer's outputs
                    after_pooler = model._local_start > m.num_layers + 1
                    second = torch.empty(b, m.hidden_size) if after_pooler else torch.empty_like(tokens)
                    x = (torch.empty(s, b, m.hidden_size), second)
                    src = topo.get_rank(pipe=dist.pp_rank - 1, data=0, model=dist.tp_rank)
                    for t in x:
                        torch.distributed.recv(t, src=src)
                outputs = model(x)  # this stage's layers
                if dist.pp_rank < cfg.parallel.pipeline - 1:
                    dst = topo.get_rank(pipe=dist.pp_rank + 1, data=0, model=dist.tp_rank)
                    for t in outputs:
                        torch.distributed.send(t.contiguous(), dst=dst)
                    return
            mlm, nsp = outputs  # [s, b, v/tp], [b, 2]
            shards = [torch.empty_like(mlm) for _ in range(cfg.parallel.tensor)]
            torch.distributed.all_gather(shards, mlm, group=parallel_state.get_tensor_model_parallel_group())
        if dist.tp_rank == 0:
            logits = torch.cat(shards, dim=-1)[..., : m.vocab_size].transpose(0, 1)
            torch.save({"mlm": logits.float().contiguous(), "nsp": nsp.float()}, args.output)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
