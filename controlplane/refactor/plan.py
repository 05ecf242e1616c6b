"""PLAN: from the serving layout to a target layout — who serves what, what moves, and whether it fits.

Pure: no processes, no sockets. The refactor executor carries a plan out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from common.errors import RefactorRefused
from common.model.partition import unit_costs
from common.model.sizes import dtype_bytes, kv_bytes_per_block
from common.model.units import Layout, unit_layer

SPAWN = -1


@dataclass(frozen=True, slots=True)
class WorkerHoldings:
    """What one worker process has: the units it serves now and the units in its host cache."""

    worker_id: int
    serving: tuple[str, ...] = ()
    cached: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelSizes:
    """Bytes the plan weighs: each unit's weights and one layer's KV pool and KV per token."""

    unit_bytes: dict[str, int]
    kv_pool_bytes_per_layer: int
    kv_bytes_per_token_layer: int

    @classmethod
    def of(cls, spec, dtype: str, block_size: int, num_kv_blocks: int) -> ModelSizes:
        """The sizes of model ``spec`` served in ``dtype`` with ``num_kv_blocks`` KV blocks of ``block_size``."""
        itemsize = dtype_bytes(dtype)
        per_block = kv_bytes_per_block(block_size, spec.num_kv_heads, spec.head_dim, itemsize)
        unit_bytes = {c.name: c.param_bytes * itemsize // spec.dtype_bytes for c in unit_costs(spec)}
        return cls(unit_bytes, per_block * num_kv_blocks, per_block // block_size)


@dataclass
class KvMove:
    layer: int
    source: int
    dest_stage: int


@dataclass
class RefactorPlan:
    """Epoch e → e+1 of one pipeline.

    Invariants: ``workers[j]`` serves new stage j (``SPAWN`` until the executor starts a
    process for it) and no worker serves two stages; ``sources[j][unit]`` is one of
    ``resident``, ``cache``, ``peer`` (then ``peers[unit]`` serves it now) or ``disk``;
    a layer's KV moves exactly when its attention unit changes worker.
    """

    kind: str
    old_layout: Layout
    new_layout: Layout
    old_workers: list[int]
    workers: list[int]
    sources: list[dict[str, str]]
    peers: dict[str, int]
    kv_moves: list[KvMove]
    stage_memory: list[int]
    weight_bytes: dict[str, int] = field(default_factory=dict)
    kv_bytes_estimate: int = 0
    stall_estimate_s: float = 0.0

    @property
    def released(self) -> list[int]:
        return [w for w in self.old_workers if w not in self.workers]

    def describe(self, names: Sequence[str]) -> dict:
        return {
            "kind": self.kind,
            "from": self.old_layout.describe(names),
            "to": self.new_layout.describe(names),
            "workers": ["new" if w == SPAWN else w for w in self.workers],
            "weight_bytes_by_source": dict(self.weight_bytes),
            "kv_layers_moving": sorted(m.layer for m in self.kv_moves),
            "kv_bytes_estimate": self.kv_bytes_estimate,
            "stall_estimate_s": round(self.stall_estimate_s, 6),
            "stage_memory": list(self.stage_memory),
        }


def refactor_kind(old: Layout, new: Layout, migrate: Sequence[int]) -> str:
    if new.num_stages > old.num_stages:
        return "split"
    if new.num_stages < old.num_stages:
        return "merge"
    if new.bounds != old.bounds:
        return "rebalance"
    if migrate:
        return "migrate"
    raise RefactorRefused(
        f"the pipeline already serves this layout ({old.num_stages} stages) and nothing is to migrate"
    )


def plan_refactor(
    names: Sequence[str],
    sizes: ModelSizes,
    old: Layout,
    old_workers: Sequence[int],
    holdings: dict[int, WorkerHoldings],
    new: Layout,
    migrate: Sequence[int] = (),
    worker_memory: int | None = None,
    max_workers: int | None = None,
    kv_tokens_in_use: int = 0,
    drain_estimate_s: float = 0.0,
    copy_bytes_per_s: float = 2e9,
) -> RefactorPlan:
    """Choose a worker per new stage (most KV and weights already in place first), the source of
    every unit it gains and the KV layers that move. Raises ``RefactorRefused`` if it cannot fit."""
    kind = refactor_kind(old, new, migrate)
    bad = [s for s in migrate if not 0 <= s < new.num_stages]
    if bad:
        raise RefactorRefused(f"cannot migrate stage(s) {bad}: the target has {new.num_stages} stages")
    stage_units = [new.stage_units(j, names) for j in range(new.num_stages)]
    serving = {w: set(h.serving) for w, h in holdings.items()}
    workers = _assign(stage_units, holdings, set(migrate))
    needed = len({w for w in workers if w != SPAWN}) + workers.count(SPAWN)
    if max_workers is not None and needed > max_workers:
        raise RefactorRefused(f"the target needs {needed} workers; at most {max_workers} are allowed")
    holder = {u: w for w, units in serving.items() for u in units}
    sources, peers, weight_bytes = [], {}, {}
    for j, units in enumerate(stage_units):
        w = workers[j]
        own = holdings.get(w, WorkerHoldings(w))
        chosen = {}
        for unit in units:
            if unit in own.serving:
                chosen[unit] = "resident"
            elif unit in own.cached:
                chosen[unit] = "cache"
            elif unit in holder:
                chosen[unit], peers[unit] = "peer", holder[unit]
            else:
                chosen[unit] = "disk"
            if chosen[unit] != "resident":
                weight_bytes[chosen[unit]] = weight_bytes.get(chosen[unit], 0) + sizes.unit_bytes[unit]
        sources.append(chosen)
    stage_memory = [_stage_bytes(units, sizes) for units in stage_units]
    if worker_memory is not None:
        for j, units in enumerate(stage_units):
            w = workers[j]
            resident_now = serving.get(w, set())
            peak = _stage_bytes(sorted(resident_now | set(units)), sizes)
            if peak > worker_memory:
                where = "a new worker" if w == SPAWN else f"worker {w}"
                raise RefactorRefused(
                    f"stage {j} ({names[new.bounds[j][0]]}..{names[new.bounds[j][1] - 1]}) needs {peak} bytes on "
                    f"{where} while both layouts are held, more than its {worker_memory} bytes"
                )
    owner_old = {unit_layer(u): holder[u] for u in names if u.endswith(".attn") and u in holder}
    moves = []
    for j, units in enumerate(stage_units):
        for unit in units:
            if unit.endswith(".attn") and owner_old.get(unit_layer(unit)) != workers[j]:
                moves.append(KvMove(unit_layer(unit), owner_old[unit_layer(unit)], j))
    kv_estimate = kv_tokens_in_use * sizes.kv_bytes_per_token_layer * len(moves)
    plan = RefactorPlan(
        kind, old, new, list(old_workers), workers, sources, peers, moves, stage_memory, weight_bytes, kv_estimate
    )
    plan.stall_estimate_s = drain_estimate_s + _delta_bytes_estimate(plan, sizes, kv_tokens_in_use) / copy_bytes_per_s
    return plan


def _stage_bytes(units: Sequence[str], sizes: ModelSizes) -> int:
    layers = sum(1 for u in units if u.endswith(".attn"))
    return sum(sizes.unit_bytes[u] for u in units) + layers * sizes.kv_pool_bytes_per_layer


def _delta_bytes_estimate(plan: RefactorPlan, sizes: ModelSizes, kv_tokens_in_use: int) -> int:
    """At SWITCH only the tokens computed since the last pre-copy round move: about one per running request."""
    return min(kv_tokens_in_use, 256) * sizes.kv_bytes_per_token_layer * len(plan.kv_moves)


def _assign(stage_units: list[list[str]], holdings: dict[int, WorkerHoldings], migrate: set[int]) -> list[int]:
    """Greedy: the (stage, worker) pairs with the most KV layers, then weights, already in place go first."""
    scores = []
    for j, units in enumerate(stage_units):
        for w, held in holdings.items():
            serving, cached = set(held.serving), set(held.cached)
            if j in migrate and serving & set(units):
                continue
            attn = sum(1 for u in units if u.endswith(".attn") and u in serving)
            score = (attn, len(serving & set(units)), len(cached & set(units)), not serving, -w)
            scores.append((score, j, w))
    workers = [SPAWN] * len(stage_units)
    taken: set[int] = set()
    for _, j, w in sorted(scores, reverse=True):
        if workers[j] == SPAWN and w not in taken:
            workers[j] = w
            taken.add(w)
    return workers
