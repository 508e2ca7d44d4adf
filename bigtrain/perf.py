"""GPU fast-path helpers: which SDPA kernel really runs, and ``train.compile`` regions.

``sdpa_backend`` profiles one attention call and reads the ATen op that ran, rather than trusting
``torch.backends.cuda.flash_sdp_enabled()`` (enabled is not selected: dtype, head size, masks and GQA
decide at call time, and a silent fallback to the math kernel costs both memory and speed).

``compiled(fn)`` wraps the elementwise regions of the model (RMSNorm, rotary, SwiGLU's gate, the loss
upcast/masking) so that ``train.compile: true`` fuses them with ``torch.compile``; with compile off
they are the plain functions. Matmuls, megatron's tensor-parallel layers and SDPA stay outside: they
are already single kernels and hold collectives that should not be traced.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bigtrain.config import Config, torch_dtype

# ATen ops SDPA dispatches to, by kernel family.
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> str:
    """The SDPA kernel family for these inputs (causal, GQA as bigtrain calls it), found by profiling."""
    from torch.profiler import ProfilerActivity, profile

    kwargs = {"is_causal": True, "enable_gqa": q.shape[1] != k.shape[1], **kwargs}
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    names = {e.name for e in prof.events()}
    found = [family for op, family in SDPA_OPS.items() if op in names]
    return found[0] if found else "unknown"


def attention_kernel(cfg: Config, device: torch.device) -> str:
    """The SDPA kernel bigtrain's attention gets for ``cfg``'s shapes and precision on ``device``."""
    m = cfg.model
    tp = cfg.parallel.tensor
    dtype = torch_dtype(cfg.precision)
    # constant inputs: the kernel choice does not depend on values, and drawing random ones would move
    # this rank's RNG alone (only rank 0 probes), putting e.g. dropout masks out of step across ranks
    q = torch.ones(1, m.num_attention_heads // tp, m.seq_length, m.head_dim, device=device, dtype=dtype)
    kv = torch.ones(1, m.kv_heads // tp, m.seq_length, m.head_dim, device=device, dtype=dtype)
    return sdpa_backend(q, kv, kv)


# ---------------------------------------------------------------------------- train.compile regions
_enabled = False


def set_compile(enabled: bool) -> None:
    """Turn the compiled regions on or off (bigtrain.models.parallelize.build_model calls this)."""
    global _enabled
    _enabled = enabled


def compile_enabled() -> bool:
    return _enabled


def compiled(fn: Callable) -> Callable:
    """``fn`` as is, or ``torch.compile(fn)`` once ``set_compile(True)`` was called. The compiled
    version is built on first use; ``BIGTRAIN_COMPILE_BACKEND`` picks another backend (tests use
    ``aot_eager``: same graph capture, no code generation)."""
    cache: dict[str, Callable] = {}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _enabled or not torch.is_grad_enabled():  # inference (KV-cache shapes vary): eager
            return fn(*args, **kwargs)
        backend = os.environ.get("BIGTRAIN_COMPILE_BACKEND", "inductor")
        if backend not in cache:
            cache[backend] = torch.compile(fn, backend=backend, dynamic=False)
        return cache[backend](*args, **kwargs)

    wrapper.eager = fn  # type: ignore[attr-defined]
    return wrapper
