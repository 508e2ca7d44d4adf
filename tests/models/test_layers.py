"""bigtrain.models.layers: the document mask shared by every layer of a forward."""

from __future__ import annotations

import gc

import torch

from bigtrain.models import layers
from bigtrain.models.layers import causal_mask, document_mask


def test_document_mask_is_built_once_per_doc_ids_and_window_and_freed_with_them():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    mask = document_mask(doc_ids, None)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    assert torch.equal(mask[:, 0], causal_mask(6, 6, None, doc_ids.device) & same_doc)
    assert not mask[0, 0, 3, 2] and mask[0, 0, 4, 3] and not mask[1, 0, 1, 0]  # no attention across documents
    assert document_mask(doc_ids, None) is mask  # every layer of the forward saves the same tensor
    windowed = document_mask(doc_ids, 2)
    assert windowed is not mask and not windowed[1, 0, 4, 2] and windowed[1, 0, 4, 3]
    assert document_mask(doc_ids.clone(), None) is not mask  # another batch: its own mask
    gc.collect()
    before = len(layers._DOCUMENT_MASKS)
    del doc_ids
    gc.collect()
    assert len(layers._DOCUMENT_MASKS) == before - 2  # both windows' entries left with their doc ids


def test_document_mask_additive_form_matches_the_bool_one():
    """The form SDPA takes (0 attended, -inf not): shared like the bool one, and the same attention."""
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]])
    additive = document_mask(doc_ids, None, torch.float32)
    assert additive.dtype == torch.float32 and document_mask(doc_ids, None, torch.float32) is additive
    boolean = document_mask(doc_ids, None)
    assert torch.equal(additive == 0, boolean)
    q, k, v = torch.randn(3, 1, 4, 8, 16).unbind(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert torch.equal(sdpa(q, k, v, attn_mask=additive), sdpa(q, k, v, attn_mask=boolean))
