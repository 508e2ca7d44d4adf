"""Bigtrain-native generation: bigtrain's own layers (megatron-core's at tensor size 1) in a world of
one process, with a KV cache per block.

A checkpoint saved at any tensor x pipeline x data layout is merged through the layout table
(``checkpoint.load_weights_only``) into the single-process model, so what is sampled here is what the
trained model computes, not a re-implementation of it; ``tools/generate.py --checkpoint`` uses this.

    with NativeModel.from_checkpoint("runs/x/checkpoints") as model:
        new_ids = model.generate(prompt_ids, max_new_tokens=32, greedy=True)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bigtrain.config import Config, config_from_dict
from bigtrain.models.llama import KVCache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def single_process_config(saved: dict, device: str = "cpu") -> Config:
    """A checkpoint's config rewritten for one process: tensor = pipeline = 1, no ZeRO, no recomputation."""
    cfg = config_from_dict(saved)
    cfg.parallel.tensor = cfg.parallel.pipeline = 1
    cfg.zero.stage, cfg.zero.offload_optimizer = 0, False
    cfg.activation_checkpointing = "none"
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 1
    cfg.train.device = device
    cfg.checkpoint.load = None
    if cfg.data.train is None:
        cfg.data.mock = True  # no data is read; keeps validation of the rest of the config
    return cfg.resolve(1)


def _start_world_of_one(cfg: Config) -> bool:
    """Start a one-process group (megatron-core's layers need parallel_state); False if one exists."""
    from megatron.core import parallel_state

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if (
            torch.distributed.get_world_size() != 1
            or parallel_state.get_tensor_model_parallel_world_size() != 1
        ):
            raise RuntimeError("bigtrain.generation runs in a single process (tensor size 1)")
        return False
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise RuntimeError(
            "bigtrain.generation runs in a single process; do not launch it with torchrun/deepspeed"
        )
    from bigtrain.distributed import _free_port, init_distributed

    # A private rendezvous, and the environment left as it was: processes started later by this one
    # (tools run as subprocesses, launchers) must not inherit a rank or this group's port.
    saved = {k: os.environ.get(k) for k in _RENDEZVOUS_VARS}
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )
    try:
        init_distributed(cfg)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return True


class NativeModel:
    """A bigtrain model in one process: full-sequence logits (the training code path) and KV-cached
    decoding (the same layers, fed one new position at a time)."""

    def __init__(
        self, model: torch.nn.Module, cfg: Config, meta: dict | None = None, owns_world: bool = False
    ):
        from bigtrain.models.parallelize import local_layers

        self.model, self.cfg, self.meta = model.eval(), cfg, meta or {}
        self.layers = local_layers(model)
        self.owns_world = owns_world
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", dtype: str = "fp32") -> NativeModel:
        """Load a checkpoint of any layout (a tag directory, or a checkpoints dir with ``latest``)."""
        from bigtrain.checkpoint import WeightReader, load_weights_only
        from bigtrain.models.parallelize import build_model

        meta = WeightReader(path).meta
        cfg = single_process_config(meta["config"], device)
        owns = _start_world_of_one(cfg)
        try:
            model = build_model(cfg)
            load_weights_only(model, cfg, path)
            model.to(device=device, dtype=DTYPES[dtype])
        except BaseException:
            if owns:
                cls._shutdown()
            raise
        return cls(model, cfg, meta, owns)

    @staticmethod
    def _shutdown() -> None:
        from bigtrain.distributed import shutdown

        shutdown()

    def close(self) -> None:
        if self.owns_world:
            self.owns_world = False
            self._shutdown()

    def __enter__(self) -> NativeModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ forward
    @property
    def vocab_size(self) -> int:
        return self.cfg.model.vocab_size

    def new_cache(self, max_length: int) -> list[KVCache]:
        return [KVCache(max_length) for _ in range(self.cfg.model.num_layers)]

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, true vocab]. With ``cache``, the tokens follow the cached
        positions and the cache is extended."""
        m = self.cfg.model
        x = self.layers[0](tokens.to(self.device))
        for i in range(1, m.num_layers + 1):
            x = self.layers[i](x, None if cache is None else cache[i - 1])
        x = self.layers[m.num_layers + 1](x)
        out = self.layers[0].logits(x) if m.tie_embeddings else self.layers[m.num_layers + 2](x)
        return out[..., : m.vocab_size].transpose(0, 1).float()  # [b, s, v]

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
