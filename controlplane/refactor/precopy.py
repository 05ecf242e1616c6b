"""KV pre-copy bookkeeping: which KV slots requests wrote since the last copy (watermarks per request)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Watermark:
    """KV of positions ``[0, upto)`` of a request, held in blocks ``table``, has been copied."""

    table: tuple[int, ...]
    upto: int


PRECOPY_ROUNDS = 3  # KV pre-copy rounds before SWITCH, at most
PRECOPY_SMALL_SLOTS = 64  # a later round whose delta is this small is left to SWITCH


def slots_since(marks: dict[int, Watermark], snapshot, block_size: int) -> tuple[np.ndarray, dict[int, Watermark]]:
    """The KV slots written since ``marks`` by each (request id, block table, positions written) of
    ``snapshot``, and the watermarks after copying them. A request whose blocks changed (preempted
    and readmitted) starts again from position 0."""
    parts, new_marks = [], {}
    for seq_id, table, computed in snapshot:
        table = tuple(table)
        mark = marks.get(seq_id)
        start = mark.upto if mark is not None and table[: len(mark.table)] == mark.table else 0
        if computed > start:
            positions = np.arange(start, computed, dtype=np.int64)
            blocks = np.asarray(table, dtype=np.int64)[positions // block_size]
            parts.append(blocks * block_size + positions % block_size)
        new_marks[seq_id] = Watermark(table, max(start, computed))
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), new_marks
