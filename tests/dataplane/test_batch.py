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


def naive_attention(q, keys, values, scale):
    """Causal attention of one sequence whose queries are the last q.shape[0] of its keys, in plain torch."""
    n_q, heads, _ = q.shape
    kv_heads = keys.shape[1]
    keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    values = values.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
    offset = keys.shape[0] - n_q
    causal = torch.arange(keys.shape[0])[None, :] <= (torch.arange(n_q)[:, None] + offset)
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).reshape(n_q, -1)


@pytest.mark.parametrize("window", [None, 5])
def test_a_long_prefill_beside_decodes_attends_in_groups_with_the_same_result(window):
    from dataplane.models.attention import new_kv_pool, paged_attention

    torch.manual_seed(0)
    block, heads, kv_heads, dim = 4, 4, 2, 8
    # three decodes (contexts 6, 9, 3) and a 30-token prefill chunk starting at position 10
    starts, q_lens = [5, 8, 10, 2], [1, 1, 30, 1]
    tables = [[0, 1], [2, 3, 4], list(range(5, 15)), [15]]
    batch = BatchInput.build([[1] * n for n in q_lens], starts, tables, block)
    groups = batch.attention_groups(window)
    assert groups is not None and len(groups) == 2, "the decodes together, the prefill alone"
    pool = new_kv_pool(16, block, kv_heads, dim, torch.float32, "cpu")
    pool.normal_()
    total = sum(q_lens)
    q, k, v = torch.randn(total, heads, dim), torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim)
    out = paged_attention(q, k, v, pool, batch, dim**-0.5, window)
    first = 0
    for start, n, table in zip(starts, q_lens, tables):
        positions = torch.arange(start + n)
        slots = torch.tensor(table)[positions // block] * block + positions % block
        keys, values = pool[0][slots], pool[1][slots]
        expected = naive_attention(q[first : first + n], keys, values, dim**-0.5)
        if window is not None:  # the window only drops keys; recompute with it
            offset = start
            rows = []
            for i in range(n):
                lo = max(0, offset + i - window + 1)
                rows.append(
                    naive_attention(
                        q[first + i : first + i + 1], keys[lo : offset + i + 1], values[lo : offset + i + 1], dim**-0.5
                    )
                )
            expected = torch.cat(rows)
        torch.testing.assert_close(out[first : first + n], expected, rtol=1e-4, atol=1e-5)
        first += n
