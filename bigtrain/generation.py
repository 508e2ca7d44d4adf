"""Bigtrain-native generation: bigtrain's own model at tensor size 1 in one process (no process
group), with a KV cache per block.

A checkpoint saved at any tensor x pipeline x data layout is merged through the layout table
(``checkpoint.load_weights_only``) into the single-process model, so what is sampled here is what the
trained model computes, not a re-implementation of it; ``tools/generate.py --checkpoint`` uses this.

    with NativeModel.from_checkpoint("runs/x/checkpoints") as model:
        new_ids = model.generate(prompt_ids, max_new_tokens=32, greedy=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bigtrain.config import Config, config_from_dict, torch_dtype
from bigtrain.models.layers import KVCache

if TYPE_CHECKING:
    from bigtrain.models.llama import LlamaModel


def single_process_config(saved: dict, device: str = "cpu") -> Config:
    """A checkpoint's config rewritten for one process: tensor = pipeline = context = expert = 1, no
    sequence parallelism (none changes a weight; weight files hold every expert), no ZeRO, no
    recomputation, and no debug control."""
    cfg = config_from_dict(saved)
    cfg.parallel.tensor = cfg.parallel.pipeline = cfg.parallel.context = cfg.parallel.expert = 1
    cfg.debug.rotate_expert_ranks = False
    cfg.parallel.sequence_parallel = False
    cfg.zero.stage, cfg.zero.offload_optimizer = 0, False
    cfg.activation_checkpointing = "none"
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 1
    cfg.train.device = device
    cfg.checkpoint.load = None
    if cfg.data.train is None:
        cfg.data.mock = True  # no data is read; keeps validation of the rest of the config
    return cfg.resolve(1)


class NativeModel:
    """A bigtrain model in one process: full-sequence logits (the training code path) and KV-cached
    decoding (the same layers, fed one new position at a time)."""

    def __init__(self, model: LlamaModel, cfg: Config, meta: dict | None = None):
        self.model, self.cfg, self.meta = model.eval(), cfg, meta or {}
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", dtype: str = "fp32") -> NativeModel:
        """Load a checkpoint of any layout (a tag directory, or a checkpoints dir with ``latest``)."""
        from bigtrain.checkpoint import WeightReader, load_weights_only
        from bigtrain.models.llama import LlamaModel
        from bigtrain.registry import build_model

        meta = WeightReader(path).meta
        cfg = single_process_config(meta["config"], device)
        if cfg.model.family != "llama":  # an encoder predicts masked tokens; it does not generate
            raise ValueError(
                f"{path}: model.family {cfg.model.family} does not generate text (a causal decoder does); "
                "for a bert checkpoint use bigtrain.evaluate, or the export's fill-mask pipeline"
            )
        model = build_model(cfg)  # tensor size 1: no process group needed
        if not isinstance(model, LlamaModel):  # pipeline size 1: never a PipelineModule
            raise TypeError(f"expected a one-stage LlamaModel, built a {type(model).__name__}")
        load_weights_only(model, cfg, path)
        model.to(device=device, dtype=torch_dtype(dtype))
        return cls(model, cfg, meta)

    def close(self) -> None:
        """Nothing to release (kept so ``with NativeModel.from_checkpoint(...)`` reads naturally)."""

    def __enter__(self) -> NativeModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ forward
    @property
    def vocab_size(self) -> int:
        if self.cfg.model.vocab_size is None:
            raise ValueError("NativeModel: model.vocab_size is not set (the config is not resolved)")
        return self.cfg.model.vocab_size

    def new_cache(self, max_length: int) -> list[KVCache]:
        return [KVCache(max_length) for _ in range(self.cfg.model.num_layers)]

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, true vocab]. With ``cache``, the tokens follow the cached
        positions and the cache is extended."""
        out = self.model.outputs(tokens.to(self.device), cache=cache)  # [s, b, padded vocab]
        return out[..., : self.cfg.model.vocab_size].transpose(0, 1).float()  # [b, s, v]

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_id: int | list[int] | None = None,
        seed: int = 0,
    ) -> list[int]:
        """New token ids after ``prompt_ids``; stops after ``eos_id`` (one id or several, as
        generation_config's ``eos_token_id``) when given."""
        stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
        if not prompt_ids:
            raise ValueError("generate: the prompt is empty (no token ids)")
        gen = torch.Generator().manual_seed(seed)
        cache = self.new_cache(len(prompt_ids) + max_new_tokens)
        next_input = torch.tensor([prompt_ids], dtype=torch.long)
        new: list[int] = []
        for _ in range(max_new_tokens):
            last = self.logits(next_input, cache)[0, -1]
            token = int(last.argmax()) if greedy else sample(last, temperature, top_p, gen)
            new.append(token)
            if token in stop:
                break
            next_input = torch.tensor([[token]], dtype=torch.long)
        return new


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the most likely token is always kept
    sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=gen)
    return int(order[choice])
