"""Wrong-on-purpose control for the loss-normalization tests: an entry point run with the normalization
bigtrain had before (each micro-batch's loss divided by its own trained tokens, then averaged over
micro-batches and data-parallel ranks), to show the tests tell it apart from the global token mean.

``python -m tests.training.per_micro_batch_mean MODULE [ARGS...]`` (MODULE: bigtrain.pretrain or
bigtrain.finetune). Without a pipeline only: the pipeline engine wants tensors in the labels tuple."""

from __future__ import annotations

import dataclasses
import runpy
import sys

from bigtrain.trainer import GlobalBatch, Trainer

_global_batch = Trainer.next_global_batch


def per_micro_batch_mean(self: Trainer, batches) -> GlobalBatch:
    return dataclasses.replace(_global_batch(self, batches), normalizer=None)  # None: lm_loss's own mean


if __name__ == "__main__":
    Trainer.next_global_batch = per_micro_batch_mean
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
