"""Micro-batch metadata: what one stage derives, the next adopts instead of deriving again."""

import pytest
import torch

from dataplane.models.batch import BatchInput
from dataplane.models.rope import RopeSpec, rotation


def build(token_lists, starts):
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(len(token_lists))]
    return BatchInput.build(token_lists, starts, tables, block_size=4)


@pytest.mark.parametrize(
    "token_lists,starts",
    [
        ([[5], [6], [7]], [3, 0, 9]),  # decode: one token each, no query padding
        ([[1, 2, 3], [4], [5, 6]], [0, 7, 2]),  # mixed prefill and decode: padded queries
    ],
)
def test_shared_tensors_rebuild_the_same_layout_and_rope_table(token_lists, starts):
    spec = RopeSpec("default", 10000.0, 8, 64, ())
    first = build(token_lists, starts)
    layout = first.attention_layout(None)
    table = first.memo("rope", lambda: rotation(*spec.cos_sin(first.positions, torch.float32)))
    shared = first.shared_tensors()
    assert all(t.dtype in (torch.float32, torch.int64) for t in shared), "only dtypes every transport carries"

    second = build(token_lists, starts)
    second.adopt([t.clone() for t in shared])
    adopted = second.attention_layout(None)
    assert torch.equal(adopted.key_slots, layout.key_slots) and torch.equal(adopted.mask, layout.mask)
    assert (adopted.max_q, adopted.max_ctx) == (layout.max_q, layout.max_ctx)
    if layout.query_rows is None:
        assert adopted.query_rows is None
    else:
        assert torch.equal(adopted.query_rows, layout.query_rows) and torch.equal(adopted.query_cols, layout.query_cols)
    assert torch.equal(second.memo("rope", lambda: None), table)
    window_layout = second.attention_layout(2)
    assert torch.equal(window_layout.mask, first.attention_layout(2).mask), "other windows are still derived"


def test_nothing_derived_means_nothing_shared():
    batch = build([[1]], [0])
    assert batch.shared_tensors() == []
    batch.adopt([])
    assert batch.attention_layout(None).max_ctx == 1
