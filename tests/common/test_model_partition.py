"""Tests of the stage partitioner: exactness against brute force, layer-boundary preference, memory limits."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest

from common.errors import PartitionError
from common.model.partition import CostModel, UnitCost, partition, stage_cost, stage_memory, unit_costs
from common.model.units import Layout, is_layer_boundary, unit_names


def llama_like(num_layers: int, **overrides) -> SimpleNamespace:
    shape = dict(
        vocab_size=1000,
        hidden_size=64,
        num_layers=num_layers,
        num_heads=8,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=256,
        tie_word_embeddings=False,
        dtype_bytes=2,
    )
    shape.update(overrides)
    return SimpleNamespace(**shape)


def random_units(num_layers: int, seed: int) -> list[UnitCost]:
    rng = random.Random(seed)
    return [
        UnitCost(
            name,
            rng.uniform(0.0, 1e9) if name != "embed" else 0.0,
            rng.randrange(1, 1000),
            rng.randrange(1, 10) if name.endswith(".attn") else 0,
        )
        for name in unit_names(num_layers)
    ]


def objective(units, layout: Layout, cost_model: CostModel) -> float:
    """Eq. 2 written out directly from stage_cost, independently of the partitioner's DP."""
    names = [u.name for u in units]
    costs = [stage_cost(units[s:e], cost_model) for s, e in layout.bounds]
    mean = sum(costs) / len(costs)
    inside = [s > 0 and not is_layer_boundary(names, s) for s, _ in layout.bounds]
    return sum(abs(c - mean) + cost_model.layer_cut_penalty * mean * r for c, r in zip(costs, inside))


def fits(units, layout: Layout, cost_model: CostModel, device_memory) -> bool:
    return device_memory is None or all(
        stage_memory(units[s:e], cost_model) <= device_memory[k] for k, (s, e) in enumerate(layout.bounds)
    )


def brute_force(units, num_stages: int, cost_model: CostModel, device_memory=None) -> float:
    best = math.inf
    for cuts in itertools.combinations(range(1, len(units)), num_stages - 1):
        layout = Layout.from_sizes([b - a for a, b in zip((0, *cuts), (*cuts, len(units)))], len(units))
        if fits(units, layout, cost_model, device_memory):
            best = min(best, objective(units, layout, cost_model))
    return best


def test_unit_costs_count_parameters_per_unit():
    spec = llama_like(2, tie_word_embeddings=True)
    units = unit_costs(spec)
    assert [u.name for u in units] == unit_names(2)
    embed, attn, mlp, head = units[0], units[1], units[2], units[-1]
    assert embed.param_bytes == 1000 * 64 * 2 and embed.flops_per_token == 0.0
    attn_matmul = 64 * 64 * 2 + 64 * 16 * 2  # q and o: 8 heads x 8; k and v: 2 kv heads x 8
    assert attn.param_bytes == (attn_matmul + 64) * 2 and attn.flops_per_token == 2 * attn_matmul
    assert attn.kv_bytes_per_token == 2 * 2 * 8 * 2
    assert mlp.param_bytes == (3 * 64 * 256 + 64) * 2 and mlp.kv_bytes_per_token == 0
    assert head.param_bytes == (1000 * 64 + 64) * 2, "a tied head still holds its own copy"
    assert unit_costs(llama_like(2, mlp_matrices=2))[2].flops_per_token == 2 * 2 * 64 * 256


def test_attention_cost_grows_with_context_and_nothing_else_does():
    spec = llama_like(2)
    short, long = unit_costs(spec, context_tokens=0), unit_costs(spec, context_tokens=100)
    for a, b in zip(short, long):
        extra = 4 * 8 * 8 * 100 if a.name.endswith(".attn") else 0  # scores and weighted values, 8 heads x 8
        assert b.flops_per_token - a.flops_per_token == extra, a.name
        assert (a.param_bytes, a.kv_bytes_per_token) == (b.param_bytes, b.kv_bytes_per_token)


def test_stage_cost_and_memory():
    model = CostModel(
        flops_per_second=1e9,
        bandwidth_bytes_per_second=1e6,
        activation_bytes_per_token=100,
        tokens_per_step=10,
        kv_tokens=7,
        memory_reserve_bytes=5,
    )
    embed, attn = UnitCost("embed", 0.0, 40, 0), UnitCost("L0.attn", 1e8, 30, 3)
    assert stage_cost([embed, attn], model) == pytest.approx(1.0), "the embed stage receives no activations"
    assert stage_cost([attn], model) == pytest.approx(1.0 + 1e-3)
    assert stage_memory([embed, attn], model) == 40 + 30 + 3 * 7 + 5


@pytest.mark.parametrize("num_layers", [0, 1, 4, 9])
def test_every_stage_count_gives_a_valid_layout(num_layers):
    units = unit_costs(llama_like(num_layers))
    for num_stages in range(1, len(units) + 1):
        layout = partition(units, num_stages)
        assert layout.num_stages == num_stages and layout.num_units == len(units)
        assert all(end > start for start, end in layout.bounds)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("penalty", [0.0, 0.05, 0.5])
def test_matches_brute_force_optimum(seed, penalty):
    units = random_units(4, seed)  # 10 units
    model = CostModel(activation_bytes_per_token=seed * 4000, layer_cut_penalty=penalty)
    for num_stages in range(1, 6):
        layout = partition(units, num_stages, model)
        assert objective(units, layout, model) == pytest.approx(
            brute_force(units, num_stages, model), rel=1e-9, abs=1e-12
        )


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_under_memory_limits(seed):
    units = random_units(4, seed)
    model = CostModel(kv_tokens=20, memory_reserve_bytes=50)
    rng = random.Random(100 + seed)
    total = sum(stage_memory([u], model) for u in units)
    for num_stages in range(2, 6):
        devices = [rng.randrange(total // (2 * num_stages), total) for _ in range(num_stages)]
        best = brute_force(units, num_stages, model, devices)
        if math.isinf(best):
            with pytest.raises(PartitionError):
                partition(units, num_stages, model, devices)
            continue
        layout = partition(units, num_stages, model, devices)
        assert fits(units, layout, model, devices)
        assert objective(units, layout, model) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_prefers_layer_boundaries_among_equally_balanced_layouts():
    units = [UnitCost(name, 1e9, 1, 0) for name in unit_names(4)]  # 10 equal units into 3 stages
    names = [u.name for u in units]
    # (3,3,4), (3,4,3) and (4,3,3) are equally balanced; only (3,4,3) cuts at layer boundaries.
    unpenalised = partition(units, 3, CostModel(layer_cut_penalty=0.0))
    penalised = partition(units, 3, CostModel(layer_cut_penalty=0.05))
    assert [e - s for s, e in penalised.bounds] == [3, 4, 3]
    assert all(is_layer_boundary(names, s) for s, _ in penalised.bounds[1:])
    assert not all(is_layer_boundary(names, s) for s, _ in unpenalised.bounds[1:]), (
        "without lambda the tie goes elsewhere"
    )
    no_penalty = CostModel(layer_cut_penalty=0.0)
    assert objective(units, unpenalised, no_penalty) == pytest.approx(objective(units, penalised, no_penalty))


def test_balance_outweighs_a_small_layer_penalty():
    units = [UnitCost(name, 1e9, 1, 0) for name in unit_names(2)]  # 6 equal units
    layout = partition(units, 2, CostModel(layer_cut_penalty=0.05))
    assert layout.bounds == ((0, 3), (3, 6)), "3+3 is perfectly balanced though the cut splits L1"


def test_memory_limits_are_respected_and_shape_the_layout():
    spec = llama_like(6)
    units = unit_costs(spec)
    model = CostModel(kv_tokens=512, memory_reserve_bytes=1 << 16)
    free = partition(units, 3, model)
    first_stage_memory = stage_memory(units[slice(*free.bounds[0])], model)
    devices = [first_stage_memory - 1, 1 << 40, 1 << 40]
    limited = partition(units, 3, model, devices)
    assert limited != free
    assert fits(units, limited, model, devices)


def test_memory_errors():
    units = unit_costs(llama_like(4))
    model = CostModel(memory_reserve_bytes=10)
    biggest_unit = max(stage_memory([u], model) for u in units)
    with pytest.raises(PartitionError, match="more than the largest device"):
        partition(units, 2, model, [biggest_unit - 1, biggest_unit - 1])
    with pytest.raises(PartitionError, match="no layout"):
        partition(units, 2, model, [biggest_unit, biggest_unit])
    with pytest.raises(PartitionError, match="3 devices for 2 stages"):
        partition(units, 2, model, [1 << 40] * 3)


def test_stage_count_out_of_range():
    units = unit_costs(llama_like(2))
    with pytest.raises(PartitionError, match="a model of 6 units can be cut into at most 6 stages"):
        partition(units, 7)
    with pytest.raises(PartitionError, match="at least 1 stage"):
        partition(units, 0)


def test_realistic_80_layer_model_into_32_stages():
    spec = llama_like(
        80,
        vocab_size=128256,
        hidden_size=8192,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=28672,
        dtype_bytes=2,
    )
    units = unit_costs(spec)
    model = CostModel(
        flops_per_second=400e12,
        bandwidth_bytes_per_second=50e9,
        activation_bytes_per_token=8192 * 2,
        kv_tokens=32768,
        memory_reserve_bytes=2 << 30,
    )
    devices = [40 << 30] * 32
    layout = partition(units, 32, model, devices)
    assert layout.num_stages == 32 and layout.num_units == 162
    assert fits(units, layout, model, devices)
    equal_sizes = Layout.from_sizes([6] * 2 + [5] * 30, 162)
    assert objective(units, layout, model) <= objective(units, equal_sizes, model) + 1e-12
