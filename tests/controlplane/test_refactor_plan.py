"""PLAN as a pure function: worker choice, weight sources, KV moves, kinds and refusals."""

import pytest

from common.errors import RefactorRefused
from common.model.units import Layout, unit_names
from controlplane.refactor.plan import SPAWN, ModelSizes, WorkerHoldings, plan_refactor

NAMES = unit_names(4)  # embed, L0.attn, L0.mlp, ..., L3.mlp, head: 10 units
SIZES = ModelSizes({name: 100 for name in NAMES}, kv_pool_bytes_per_layer=50, kv_bytes_per_token_layer=2)
TWO = Layout.from_sizes([5, 5], 10)


def holdings(*serving, cached=None):
    cached = cached or {}
    result = {}
    for worker, layout_stage in enumerate(serving):
        units = tuple(TWO.stage_units(layout_stage, NAMES)) if layout_stage is not None else ()
        result[worker] = WorkerHoldings(worker, units, tuple(cached.get(worker, ())))
    return result


def test_a_split_keeps_kv_in_place_where_it_can_and_spawns_the_rest():
    four = Layout.from_sizes([3, 2, 2, 3], 10)
    plan = plan_refactor(NAMES, SIZES, TWO, [0, 1], holdings(0, 1), four, kv_tokens_in_use=100)
    assert plan.kind == "split"
    assert plan.workers == [0, SPAWN, SPAWN, 1]
    assert sorted(m.layer for m in plan.kv_moves) == [1, 2]
    assert {m.layer: m.source for m in plan.kv_moves} == {1: 0, 2: 1}
    assert plan.sources[1] == {"L1.attn": "peer", "L1.mlp": "peer"} and plan.peers["L1.attn"] == 0
    assert plan.sources[0] == {u: "resident" for u in NAMES[:3]}
    assert plan.weight_bytes == {"peer": 400}
    assert plan.kv_bytes_estimate == 100 * 2 * 2
    assert plan.released == []


def test_a_merge_prefers_the_worker_with_the_most_kv_and_reads_nothing_twice():
    one = Layout.from_sizes([10], 10)
    plan = plan_refactor(NAMES, SIZES, TWO, [0, 1], holdings(0, 1), one)
    assert (
        plan.kind == "merge" and len(plan.workers) == 1 and plan.released == [w for w in (0, 1) if w != plan.workers[0]]
    )
    moved = {m.layer for m in plan.kv_moves}
    assert moved in ({0, 1}, {2, 3})
    assert set(plan.sources[0].values()) == {"resident", "peer"}


def test_units_in_a_workers_cache_come_from_the_cache_before_a_peer():
    four = Layout.from_sizes([3, 2, 2, 3], 10)
    idle_with_cache = holdings(0, 1, None, cached={2: ("L1.attn", "L1.mlp")})
    plan = plan_refactor(NAMES, SIZES, TWO, [0, 1], idle_with_cache, four)
    assert plan.workers[1] == 2
    assert plan.sources[1] == {"L1.attn": "cache", "L1.mlp": "cache"}
    assert plan.workers[2] == SPAWN


def test_a_rebalance_inside_a_layer_moves_only_the_crossing_unit():
    shifted = Layout.from_spec(["embed..L2.attn", "L2.mlp..head"], NAMES)
    plan = plan_refactor(NAMES, SIZES, TWO, [0, 1], holdings(0, 1), shifted)
    assert plan.kind == "rebalance" and plan.workers == [0, 1]
    assert [(m.layer, m.source, m.dest_stage) for m in plan.kv_moves] == [(2, 1, 0)]
    assert plan.sources[0]["L2.attn"] == "peer" and plan.sources[1]["L2.mlp"] == "resident"


def test_a_migrate_moves_the_stage_to_another_worker():
    plan = plan_refactor(NAMES, SIZES, TWO, [0, 1], holdings(0, 1, None), TWO, migrate=[1])
    assert plan.kind == "migrate" and plan.workers == [0, 2]
    assert sorted(m.layer for m in plan.kv_moves) == [2, 3]


def test_refusals_say_why_and_nothing_is_planned():
    with pytest.raises(RefactorRefused, match="already serves"):
        plan_refactor(NAMES, SIZES, TWO, [0, 1], holdings(0, 1), TWO)
    with pytest.raises(RefactorRefused, match="cannot migrate stage"):
        plan_refactor(NAMES, SIZES, TWO, [0, 1], holdings(0, 1), TWO, migrate=[5])
    with pytest.raises(RefactorRefused, match="at most 2"):
        plan_refactor(NAMES, SIZES, TWO, [0, 1], holdings(0, 1), Layout.from_sizes([5, 3, 2], 10), max_workers=2)
    whole = 10 * 100 + 4 * 50
    with pytest.raises(RefactorRefused, match="needs 1200 bytes"):
        plan_refactor(NAMES, SIZES, TWO, [0, 1], holdings(0, 1), Layout.from_sizes([10], 10), worker_memory=whole - 1)
    assert plan_refactor(NAMES, SIZES, TWO, [0, 1], holdings(0, 1), Layout.from_sizes([10], 10), worker_memory=whole)
