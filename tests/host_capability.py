"""``python -m tests.host_capability fp16=on|off MODULE [ARGS...]``: run an entry point (``python -m
MODULE ARGS``) as if this host's CPU did (``on``) or did not (``off``) support fp16 in DeepSpeed's
CPU accelerator, so what depends on that capability is tested on every host, whichever it is.

DeepSpeed asks oneDNN (``torch.ops.mkldnn._is_mkldnn_fp16_supported``), which says yes only on
processors with AVX512-FP16/AMX-FP16; torch itself computes fp16 on any x86 CPU (slower), so ``on``
runs the real fp16 training path (loss scaling, overflow skips) on a host without the instructions.
Tests only: bigtrain itself refuses precision=fp16 where the accelerator says no.
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str]) -> None:
    flag, module, *args = argv
    name, _, value = flag.partition("=")
    if name != "fp16" or value not in ("on", "off"):
        raise SystemExit(f"usage: python -m tests.host_capability fp16=on|off MODULE [ARGS...]; got {flag!r}")
    from deepspeed.accelerator import get_accelerator

    supported = value == "on"
    type(get_accelerator()).is_fp16_supported = lambda self: supported
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
