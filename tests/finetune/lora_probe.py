"""``[torchrun --nproc_per_node T] python -m tests.finetune.lora_probe --output FILE [--dropout P]``: a tiny
SFT model with LoRA adapters at tensor parallel T (the world size), its adapters' B set to fixed non-zero
values (so the adapters, and their dropout, change the outputs), run on two packed sequences:

- ``eval``: logits in eval mode, twice, and whether that touched the global RNG;
- ``train``: after ``torch.manual_seed(1234)``, logits and loss in train mode, then every LoRA gradient
  (full tensors: tensor-parallel shards merged), and a second train-mode forward with another seed.

Rank 0 saves the results (a dict of tensors) so runs at different tensor sizes can be compared."""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True)
    parser.add_argument("--dropout", type=float, default=0.3)
    args = parser.parse_args(argv)

    from megatron.core import parallel_state

    from bigtrain.config import load_config
    from bigtrain.distributed import init_distributed, shutdown, world_size_from_env
    from bigtrain.models import layout
    from bigtrain.models.parallelize import tensor_parallel
    from bigtrain.registry import build_model, local_parameters

    world = world_size_from_env()
    cfg = load_config(
        None,
        [
            "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
            "model.ffn_hidden_size=128", "model.seq_length=16", "model.vocab_size=100", "train.device=cpu",
            "finetune.task=sft", "finetune.train=unused", "data.tokenizer=unused", "finetune.lora.rank=4",
            f"finetune.lora.dropout={args.dropout}", f"parallel.tensor={world}", "train.micro_batch_size=2",
            "train.global_batch_size=2",
        ],
    ).resolve(world)  # fmt: skip
    dist = init_distributed(cfg)
    try:
        model = build_model(cfg, dist.topology)
        tp = tensor_parallel(cfg)
        rank, size = tp.rank, tp.size
        params = local_parameters(model, cfg)
        with torch.no_grad():  # B = 0 at init: give the adapters an effect, the same full values at any TP
            for key, (lp, param) in params.items():
                if key.endswith("lora_B"):
                    gen = torch.Generator().manual_seed(len(key) * 7919 + lp.index)
                    full = torch.randn(layout.full_shape(lp.spec, cfg.model, 0), generator=gen) * 0.5
                    param.copy_(layout.shard(full, lp.spec.split, rank, size))
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(4, 100, (2, 16), generator=gen)
        positions = torch.cat([torch.arange(9), torch.arange(7)]).expand(2, 16).contiguous()
        doc_ids = torch.cat([torch.zeros(9), torch.ones(7)]).long().expand(2, 16).contiguous()
        labels = torch.randint(4, 100, (2, 16), generator=gen)
        loss_mask = (torch.rand(2, 16, generator=gen) < 0.6).float()
        group = parallel_state.get_tensor_model_parallel_group()

        def logits() -> torch.Tensor:  # [s, b, v/tp] -> [b, s, vocab]
            out = model.outputs(tokens, positions, doc_ids)
            shards = [torch.empty_like(out) for _ in range(size)]
            torch.distributed.all_gather(shards, out.detach().contiguous(), group=group)
            return torch.cat(shards, dim=-1)[..., : cfg.model.vocab_size].transpose(0, 1)

        result: dict[str, torch.Tensor] = {}
        model.eval()
        rng = torch.get_rng_state()
        with torch.no_grad():
            result["eval"], result["eval_again"] = logits(), logits()
        result["eval_used_rng"] = torch.tensor(not torch.equal(rng, torch.get_rng_state()))
        model.train()
        torch.manual_seed(1234)
        result["train"] = logits()
        torch.manual_seed(1234)
        loss = model(tokens, positions, doc_ids, labels, loss_mask)
        loss.backward()
        result["loss"] = loss.detach()
        for key, (lp, param) in params.items():
            if "lora_" in key:
                shards = [torch.empty_like(param.grad) for _ in range(size)]
                torch.distributed.all_gather(shards, param.grad.contiguous(), group=group)
                result[f"grad.{key}"] = layout.merge(shards, lp.spec.split, key)
        torch.manual_seed(99)
        result["train_other_seed"] = logits()
        if dist.rank == 0:
            torch.save(result, args.output)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
