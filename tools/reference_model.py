"""The plain PyTorch training loop ``tools/bench.py`` compares bigtrain with: the same Llama
architecture (RMSNorm, rotary, grouped-query attention through SDPA, SwiGLU, padded vocabulary,
optional tied embeddings) written with ``torch.nn``, trained with ``torch.optim.AdamW`` (fused on
GPU, foreach on CPU), autocast for bf16/fp16 over fp32 weights, the same gradient clipping,
accumulation and activation checkpointing, and optionally ``torch.compile`` on the whole model.
It is what a user would write instead of using a framework; it has no parallelism.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bigtrain.config import Config

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.nq, self.nkv, self.d = m.num_attention_heads, m.kv_heads, m.head_dim
        self.recompute = cfg.activation_checkpointing
        self.norm1 = nn.RMSNorm(m.hidden_size, eps=m.norm_eps)
        self.qkv = nn.Linear(m.hidden_size, (self.nq + 2 * self.nkv) * self.d, bias=False)
        self.proj = nn.Linear(self.nq * self.d, m.hidden_size, bias=False)
        self.norm2 = nn.RMSNorm(m.hidden_size, eps=m.norm_eps)
        self.gate_up = nn.Linear(m.hidden_size, 2 * m.ffn_size, bias=False)
        self.down = nn.Linear(m.ffn_size, m.hidden_size, bias=False)

    @staticmethod
    def _core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([self.nq * self.d, self.nkv * self.d, self.nkv * self.d], -1)
        q = _rotate(q.view(b, s, self.nq, self.d), cos, sin).transpose(1, 2)
        k = _rotate(k.view(b, s, self.nkv, self.d), cos, sin).transpose(1, 2)
        v = v.view(b, s, self.nkv, self.d).transpose(1, 2)
        if self.recompute == "selective" and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, use_reentrant=False)
        else:
            out = self._core(q, k, v)
        x = x + self.proj(out.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)


class ReferenceLlama(nn.Module):
    """tokens, labels, loss_mask [b, s] -> mean next-token loss (like bigtrain's model)."""

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        vocab = cfg.derived.padded_vocab_size
        self.embed = nn.Embedding(vocab, m.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(m.num_layers))
        self.norm = nn.RMSNorm(m.hidden_size, eps=m.norm_eps)
        self.head = nn.Linear(m.hidden_size, vocab, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        inv = 1.0 / (m.rope_theta ** (torch.arange(0, m.head_dim, 2).float() / m.head_dim))
        freqs = torch.outer(torch.arange(m.seq_length).float(), inv)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [s, 1, d]: broadcasts over [b, s, heads, d]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = m.init_std / (
                    math.sqrt(2 * m.num_layers) if name.endswith(("proj.weight", "down.weight")) else 1
                )
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        losses = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        mask = loss_mask.reshape(-1).to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp(min=1)


class ReferenceTrainer:
    """One optimizer step = ``grad_accum_steps`` micro-batches, clipping, AdamW."""

    def __init__(self, cfg: Config, device: torch.device, compile: bool = False):
        self.cfg, self.device = cfg, device
        self.model = ReferenceLlama(cfg).to(device)
        o = cfg.optim
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused, foreach=not fused
        )
        self.dtype = AUTOCAST.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.forward = torch.compile(self.model) if compile else self.model

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Returns the mean loss as a device tensor (no host synchronization)."""
        total = torch.zeros((), device=self.device)
        for b in micro_batches:
            b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            with self._autocast():
                loss = self.forward(b["tokens"], b["labels"], b["loss_mask"]) / len(micro_batches)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip, foreach=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total
