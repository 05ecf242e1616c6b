"""PLAN for a pipeline deployed on a cluster: what a refactor would move, from the coordinator's view.

The refactor coordinator calls ``RefactorPlanner`` in PLAN. It reads the deploy
coordinator's pipeline record (stages, their workers, the KV cache size) and the model's
config, and plans with the same pure planner as the offline pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from common import events as ev
from common.errors import FlexPipeError, RefactorRefused
from common.model.partition import partition_model
from common.model.spec import ModelSpec
from common.model.units import Layout, unit_names
from controlplane.refactor.plan import SPAWN, ModelSizes, RefactorPlan, WorkerHoldings, plan_refactor


class ClusterView(Protocol):
    """What the planner reads of the cluster (the monitor actor answers it)."""

    def alive_workers(self) -> list[str]: ...

    def free_memory(self, worker_id: str) -> int | None: ...

    def engine_load(self, pipeline_id: str) -> tuple[int, float]: ...

    def spawner(self) -> tuple[str, int] | None: ...

    def stages_served(self, worker_id: str) -> int: ...


@dataclass(frozen=True, slots=True)
class ClusterPlanSummary:
    """What PLAN found, in the cluster's own worker names (``new`` for a worker still to be started)."""

    kind: str
    source: list[str]
    target: list[str]
    workers: list[str]
    moves: list[str]
    kv_layers_moved: list[int] = field(default_factory=list)
    stage_memory: list[int] = field(default_factory=list)
    weight_bytes_by_source: dict[str, int] = field(default_factory=dict)
    kv_bytes_estimate: int = 0
    stall_estimate_s: float = 0.0
    from_epoch: int = 0
    engine_host: str = ""


@dataclass
class ClusterPlan:
    """A plan with worker names: ``names[i]`` is the worker the pure plan calls ``i``; ``spawner`` starts
    the workers the plan marks ``SPAWN``."""

    plan: RefactorPlan
    names: list[str]
    unit_names: list[str]
    summary: ClusterPlanSummary
    spawner: str = ""

    def worker(self, index: int) -> str:
        return self.names[index]

    @property
    def to_spawn(self) -> int:
        return self.plan.workers.count(SPAWN)

    def adopt_spawned(self, worker_ids: list[str]) -> None:
        """Give the ``SPAWN`` stages the workers started for them, in order."""
        fresh = iter(worker_ids)
        for j, worker in enumerate(self.plan.workers):
            if worker == SPAWN:
                self.names.append(next(fresh))
                self.plan.workers[j] = len(self.names) - 1


class RefactorPlanner:
    """Plans refactors of the deploy coordinator's pipelines.

    Invariants: reads the coordinator's and the cluster view's state, never changes it; a
    pipeline that is not READY, an unknown pipeline, a target the planner rejects, one that
    needs more new workers than a supervisor can start, or a stage that does not fit the free
    memory of its worker's device, is refused with the reason. New stages go to alive workers
    that serve no stage of the pipeline (those whose host cache holds the units first, then those
    serving the fewest stages of other pipelines), else to workers started for them. KV bytes and
    the stall are estimated from the engine's last reported KV use and step time.
    """

    def __init__(self, coordinator, cluster: ClusterView) -> None:
        self.coordinator = coordinator
        self.cluster = cluster

    def __call__(self, request: ev.RefactorPipeline, cached: dict[str, set[str]] | None = None) -> ClusterPlan:
        cached = cached or {}
        pipeline = self.coordinator.pipelines.get(request.pipeline_id)
        if pipeline is None:
            raise RefactorRefused(f"no pipeline {request.pipeline_id!r}")
        if pipeline.state != "READY":
            raise RefactorRefused(f"pipeline {request.pipeline_id!r} is {pipeline.state}, not READY")
        deploy = pipeline.request
        try:
            spec = ModelSpec.from_dir(Path(deploy.model_dir))
        except FlexPipeError as exc:
            raise RefactorRefused(str(exc)) from exc
        names = unit_names(spec.num_layers)
        old = Layout.from_sizes([len(units) for units in pipeline.plan.stage_units], len(names))
        new = self._target(request, spec, names, pipeline.plan.max_model_len)
        idle = [w for w in self.cluster.alive_workers() if w not in pipeline.workers and w not in self.coordinator.lost]
        worker_ids = list(dict.fromkeys(pipeline.workers)) + sorted(
            idle, key=lambda w: (self.cluster.stages_served(w), w)
        )
        index = {w: i for i, w in enumerate(worker_ids)}
        holdings = {
            index[w]: WorkerHoldings(index[w], tuple(units), tuple(sorted(cached.get(w, ()))))
            for w, units in zip(pipeline.workers, pipeline.plan.stage_units)
        }
        holdings.update({index[w]: WorkerHoldings(index[w], (), tuple(sorted(cached.get(w, ())))) for w in idle})
        sizes = ModelSizes.of(spec, deploy.dtype, deploy.block_size, pipeline.plan.num_kv_blocks)
        kv_tokens, step_s = self.cluster.engine_load(request.pipeline_id)
        plan = plan_refactor(
            names,
            sizes,
            old,
            [index[w] for w in pipeline.workers],
            holdings,
            new,
            request.migrate,
            request.worker_memory or None,
            request.max_workers or None,
            kv_tokens_in_use=kv_tokens,
            drain_estimate_s=step_s,
        )
        spawner = self._spawner(plan, request.dry_run)
        label = lambda w: "new" if w == SPAWN else worker_ids[w]  # noqa: E731
        self._check_fit(plan, holdings, sizes, names, label)
        moves = [
            f"KV of layer {m.layer}: {label(m.source)} -> {label(plan.workers[m.dest_stage])}" for m in plan.kv_moves
        ]
        moves += [
            f"{unit}: {source} -> {label(plan.workers[j])}"
            for j, chosen in enumerate(plan.sources)
            for unit, source in chosen.items()
            if source != "resident"
        ]
        summary = ClusterPlanSummary(
            plan.kind,
            old.describe(names),
            new.describe(names),
            [label(w) for w in plan.workers],
            moves,
            sorted(m.layer for m in plan.kv_moves),
            list(plan.stage_memory),
            dict(plan.weight_bytes),
            plan.kv_bytes_estimate,
            plan.stall_estimate_s,
            pipeline.epoch,
            pipeline.engine_host,
        )
        return ClusterPlan(plan, worker_ids, names, summary, spawner)

    def _spawner(self, plan: RefactorPlan, dry_run: bool) -> str:
        missing = plan.workers.count(SPAWN)
        if not missing:
            return ""
        spawner = self.cluster.spawner()
        if spawner is None or spawner[1] < missing:
            if dry_run:
                return ""
            can = spawner[1] if spawner else 0
            raise RefactorRefused(
                f"the target needs {missing} more worker(s) than are alive and idle, and no "
                f"supervisor can start them (it can start {can})"
            )
        return spawner[0]

    def _check_fit(self, plan: RefactorPlan, holdings: dict, sizes: ModelSizes, names: list[str], label) -> None:
        for j, worker in enumerate(plan.workers):
            if worker == SPAWN:
                continue
            free = self.cluster.free_memory(label(worker))
            if free is None:
                continue
            resident = set(holdings[worker].serving)
            gained = [u for u in plan.new_layout.stage_units(j, names) if u not in resident]
            need = sum(sizes.unit_bytes[u] for u in gained) + sizes.kv_pool_bytes_per_layer * sum(
                1 for u in gained if u.endswith(".attn")
            )
            if need > free:
                raise RefactorRefused(f"stage {j} needs {need} more bytes on {label(worker)}, which has {free} free")

    @staticmethod
    def _target(request: ev.RefactorPipeline, spec: ModelSpec, names: list[str], max_model_len: int) -> Layout:
        try:
            if request.layout:
                return Layout.from_spec(request.layout, names)
            if not request.num_stages or request.num_stages < 1:
                raise RefactorRefused("give a stage count >= 1 or a layout")
            return partition_model(spec, request.num_stages, max_model_len // 2)
        except RefactorRefused:
            raise
        except FlexPipeError as exc:
            raise RefactorRefused(f"bad target: {exc}") from exc
