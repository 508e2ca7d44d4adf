"""What a task feeds its model from a micro-batch: which items are the model's inputs and which its
loss's targets (:class:`BatchAdapter`), one per kind of data. Its own module so that the composition
root (:mod:`bigtrain.registry`) can name a family's adapter without importing the step runners."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BatchAdapter:
    """Which entries of a micro-batch are the model's inputs and which its loss's targets (the first two
    targets are always ``labels, loss_mask``; the trainer's loss normalizer counts ``loss_mask``)."""

    inputs: tuple[str, ...] = ("tokens",)
    target_keys: tuple[str, ...] = ("labels", "loss_mask")

    def model_inputs(self, b: Batch) -> tuple[torch.Tensor, ...]:
        return tuple(b[k] for k in self.inputs)

    def targets(self, b: Batch) -> tuple[torch.Tensor, ...]:
        return tuple(b[k] for k in self.target_keys)


LM_BATCH = BatchAdapter(("tokens",))  # pretraining: tokens -> (labels, loss_mask)
PACKED_BATCH = BatchAdapter(("tokens", "positions", "doc_ids"))  # fine-tuning (packed SFT, classify)
# the bert family's pretraining: masked tokens and the sentence-pair label (bigtrain.data.bert's items)
BERT_BATCH = BatchAdapter(("tokens", "token_types", "attention_mask"), ("labels", "loss_mask", "nsp_labels"))
ENCODER_BATCH = BatchAdapter(("tokens", "token_types", "attention_mask"))  # the bert family's fine-tuning
