"""``torchrun --nproc_per_node=2 -m tests.models.context_grad_worker OUT.json``: one forward and backward of
the tiny llama at context parallel 2 against the same weights at one rank (tests/models/test_context.py).

Each rank builds the model through bigtrain's own wiring (``init_distributed``, ``parallelize.build``,
the layout-independent init) at ``parallel.context=2`` and a reference ``LlamaModel`` without any
parallelism holding the same weights. One micro-batch of 2 random sequences of 32 tokens, every token
trained ("all"), and again with the second half all masked ("half": context rank 1 trains no token,
acceptance 4). The context model sees its rank's
chunk (``step_runner.to_device``) with the global-token normalizer, its gradients are summed over the
context group as DeepSpeed's sequence-data-parallel reduction does; the reference sees whole sequences.
A third model rotates every chunk from position 0 (``debug.skip_rotary_offset``, the control).

Rank 0 writes, per case and rank: the two losses, each parameter's gradient difference relative to the
reference's largest value, the rank's own loss and whether its gradients were finite, and the control's
worst difference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out: str) -> None:
    torch.set_num_threads(1)

    from bigtrain.config import load_config
    from bigtrain.distributed import init_distributed, shutdown

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "tiny.yaml", ["parallel.context=2", "train.micro_batch_size=2"])
    cfg.resolve(2)
    dist = init_distributed(cfg)
    try:
        results = {case: run_case(cfg, dist, case) for case in ("all", "half")}
        gathered: list[object] = [None, None]
        torch.distributed.all_gather_object(gathered, {"rank": dist.cp_rank, **results})
        if dist.rank == 0:
            Path(out).write_text(json.dumps(gathered, indent=1))
    finally:
        shutdown()


def run_case(cfg, dist, case: str) -> dict[str, object]:
    from megatron.core import parallel_state

    from bigtrain.models.layers import TensorParallel
    from bigtrain.models.llama import LlamaModel
    from bigtrain.models.parallelize import build, initialize_weights
    from bigtrain.step_runner import to_device

    torch.manual_seed(0)
    b, s, vocab = 2, cfg.model.seq_length, cfg.model.vocab_size
    mask = torch.ones(b, s)
    if case == "half":
        mask[:, s // 2 :] = 0
    full = {
        "tokens": torch.randint(0, vocab, (b, s)),
        "labels": torch.randint(0, vocab, (b, s)),
        "loss_mask": mask,
    }
    normalizer = full["loss_mask"].sum()  # the global batch's trained tokens / (1 micro-batch x DP 1)

    def context_grads(skip_offset: bool) -> tuple[float, float, dict[str, torch.Tensor], bool]:
        cfg.debug.skip_rotary_offset = skip_offset
        model = build(cfg)
        initialize_weights(model, cfg)
        mine = to_device(full, dist.device)  # this rank's chunk of the sequence
        loss = model(mine["tokens"], mine["labels"], mine["loss_mask"], normalizer)
        loss.backward()
        finite = all(bool(p.grad.isfinite().all()) for p in model.parameters())
        own = float(loss.detach())
        total = loss.detach().clone()
        group = parallel_state.get_context_parallel_group()
        torch.distributed.all_reduce(total, group=group)
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.clone()
            torch.distributed.all_reduce(g, group=group)  # DeepSpeed sums over context ranks
            grads[name] = g
        return float(total), own, grads, finite

    loss_cp, own, grads, finite = context_grads(skip_offset=False)
    _, _, control, _ = context_grads(skip_offset=True)
    cfg.debug.skip_rotary_offset = False

    reference = LlamaModel(cfg.model, TensorParallel(), cfg.derived.padded_vocab_size)
    reference.load_state_dict(_init_state(cfg))
    loss_ref = reference(full["tokens"], full["labels"], full["loss_mask"], normalizer)
    loss_ref.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    def worst(got: dict[str, torch.Tensor]) -> dict[str, float]:
        return {n: float((got[n] - g).abs().max() / g.abs().max()) for n, g in ref_grads.items()}

    return {
        "loss_context": loss_cp,
        "loss_reference": float(loss_ref.detach()),
        "own_loss": own,
        "own_grads_finite": finite,
        "grad_rel": worst(grads),
        "control_grad_rel": max(worst(control).values()),
    }


def _init_state(cfg) -> dict[str, torch.Tensor]:
    """The layout-independent initial weights (the same values ``initialize_weights`` gives any rank)."""
    from bigtrain.models.parallelize import build, initialize_weights

    model = build(cfg)
    initialize_weights(model, cfg)
    return model.state_dict()


if __name__ == "__main__":
    main(sys.argv[1])
