"""``python -m tests.entry_point [OPTIONS] MODULE [ARGS...]``: run an entry point (``python -m MODULE
ARGS``) under conditions a test needs to control, so the same checks hold on every host.

- ``--fp16=on|off``: as if this host's CPU did (``on``) or did not (``off``) support fp16 in DeepSpeed's
  CPU accelerator. DeepSpeed asks oneDNN (``torch.ops.mkldnn._is_mkldnn_fp16_supported``), which says
  yes only on processors with AVX512-FP16/AMX-FP16; torch itself computes fp16 on any x86 CPU (slower),
  so ``on`` runs the real fp16 training path on a host without those instructions. bigtrain itself
  refuses precision=fp16 where the accelerator says no.
- ``--without-patch=NAME``: ``bigtrain.compat.NAME`` does nothing, to show what fails without it (the
  compat table's "fails without it" column).
- ``--no-start-up``: a run that gets as far as ``bigtrain.distributed.init_distributed`` (process
  group, DeepSpeed) prints ``START-UP REACHED`` on stderr and exits 97 at once. What a test expects to be
  refused "before start-up" is then proven so by structure, not by how fast this host is.
"""

from __future__ import annotations

import os
import runpy
import sys

START_UP_REACHED = "START-UP REACHED"


def main(argv: list[str]) -> None:
    fp16, no_start_up, without = None, False, []
    while argv and argv[0].startswith("--"):  # our options, up to the module
        option = argv.pop(0)
        if option in ("--fp16=on", "--fp16=off"):
            fp16 = option.endswith("on")
        elif option == "--no-start-up":
            no_start_up = True
        elif option.startswith("--without-patch="):
            without.append(option.split("=", 1)[1])
        else:
            raise SystemExit(f"python -m tests.entry_point: unknown option {option!r} (see its docstring)")
    if not argv:
        raise SystemExit(
            "python -m tests.entry_point [--fp16=on|off] [--without-patch=NAME] [--no-start-up] MODULE [ARGS...]"
        )
    module, *args = argv
    if fp16 is not None:
        from deepspeed.accelerator import get_accelerator

        type(get_accelerator()).is_fp16_supported = lambda self: fp16
    for name in without:
        import bigtrain.compat

        if not callable(getattr(bigtrain.compat, name, None)):
            raise SystemExit(f"python -m tests.entry_point: bigtrain.compat has no patch {name!r}")
        setattr(bigtrain.compat, name, lambda *args, **kwargs: None)
    if no_start_up:
        import bigtrain.distributed

        def reached(*_args, **_kwargs):
            print(START_UP_REACHED, file=sys.stderr, flush=True)
            os._exit(97)

        bigtrain.distributed.init_distributed = reached
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
