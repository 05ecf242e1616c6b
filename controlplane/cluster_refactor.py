"""PLAN for a pipeline deployed on a cluster: what a refactor would move, from the coordinator's view.

The refactor coordinator calls ``ClusterRefactorPlanner`` in PLAN. It reads the deploy
coordinator's pipeline record (stages, their workers, the KV cache size) and the model's
config, and plans with the same pure planner as the offline pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common import events as ev
from common.errors import FlexPipeError, RefactorRefused
from dataplane.models.checkpoint import read_config
from dataplane.models.spec import ModelSpec
from dataplane.partitioner import partition_model
from dataplane.refactor_plan import SPAWN, ModelSizes, RefactorPlan, WorkerHoldings, plan_refactor
from dataplane.units import Layout, unit_names


@dataclass(frozen=True, slots=True)
class ClusterPlanSummary:
    """What PLAN found, in the cluster's own worker names."""

    kind: str
    target: list[str]
    workers: list[str]
    moves: list[str]
    weight_bytes_by_source: dict[str, int] = field(default_factory=dict)
    kv_bytes_estimate: int = 0
    stall_estimate_s: float = 0.0
    from_epoch: int = 0


@dataclass
class ClusterPlan:
    """A plan with worker names: ``names[i]`` is the worker the pure plan calls ``i``."""

    plan: RefactorPlan
    names: list[str]
    unit_names: list[str]
    summary: ClusterPlanSummary

    def worker(self, index: int) -> str:
        return self.names[index]


class ClusterRefactorPlanner:
    """Plans refactors of the coordinator's pipelines.

    Invariants: reads the coordinator's and monitor's state, never changes it; a pipeline
    that is not READY, an unknown pipeline, a target the planner rejects or one that needs
    more idle workers than are alive, or a stage that does not fit the free memory of its
    worker's device, is refused with the reason. New stages go to alive workers that serve
    no stage of the pipeline.
    """

    def __init__(self, coordinator, idle_workers, free_memory=lambda worker: None) -> None:
        self.coordinator = coordinator
        self.idle_workers = idle_workers
        self.free_memory = free_memory

    def __call__(self, request: ev.RefactorPipeline) -> ClusterPlan:
        pipeline = self.coordinator.pipelines.get(request.pipeline_id)
        if pipeline is None:
            raise RefactorRefused(f"no pipeline {request.pipeline_id!r}")
        if pipeline.state != "READY":
            raise RefactorRefused(f"pipeline {request.pipeline_id!r} is {pipeline.state}, not READY")
        deploy = pipeline.request
        try:
            spec = ModelSpec.from_config(read_config(Path(deploy.model_dir)))
        except FlexPipeError as exc:
            raise RefactorRefused(str(exc)) from exc
        names = unit_names(spec.num_layers)
        old = Layout.from_sizes([len(units) for units in pipeline.plan.stage_units], len(names))
        new = self._target(request, spec, names)
        idle = [w for w in self.idle_workers() if w not in pipeline.workers and w not in self.coordinator.lost]
        worker_ids = list(dict.fromkeys(pipeline.workers)) + sorted(idle)
        index = {w: i for i, w in enumerate(worker_ids)}
        holdings = {index[w]: WorkerHoldings(index[w], tuple(units))
                    for w, units in zip(pipeline.workers, pipeline.plan.stage_units)}
        holdings.update({index[w]: WorkerHoldings(index[w]) for w in idle})
        sizes = ModelSizes.of(spec, deploy.dtype, deploy.block_size, pipeline.plan.num_kv_blocks)
        plan = plan_refactor(names, sizes, old, [index[w] for w in pipeline.workers], holdings, new,
                             request.migrate, kv_tokens_in_use=0)
        if SPAWN in plan.workers:
            raise RefactorRefused(f"the target needs {plan.workers.count(SPAWN)} more worker(s) than are alive and idle")
        label = lambda w: worker_ids[w]  # noqa: E731
        self._check_fit(plan, holdings, sizes, names, label)
        moves = [f"KV of layer {m.layer}: {label(m.source)} -> {label(plan.workers[m.dest_stage])}" for m in plan.kv_moves]
        moves += [f"{unit}: {source} -> {label(plan.workers[j])}" for j, chosen in enumerate(plan.sources)
                  for unit, source in chosen.items() if source != "resident"]
        summary = ClusterPlanSummary(plan.kind, new.describe(names), [label(w) for w in plan.workers], moves,
                                     dict(plan.weight_bytes), plan.kv_bytes_estimate, plan.stall_estimate_s,
                                     pipeline.epoch)
        return ClusterPlan(plan, worker_ids, names, summary)

    def _check_fit(self, plan: RefactorPlan, holdings: dict, sizes: ModelSizes, names: list[str], label) -> None:
        for j, worker in enumerate(plan.workers):
            free = self.free_memory(label(worker))
            if free is None:
                continue
            resident = set(holdings[worker].serving)
            gained = [u for u in plan.new_layout.stage_units(j, names) if u not in resident]
            need = sum(sizes.unit_bytes[u] for u in gained) + sizes.kv_pool_bytes_per_layer * sum(
                1 for u in gained if u.endswith(".attn"))
            if need > free:
                raise RefactorRefused(f"stage {j} needs {need} more bytes on {label(worker)}, which has {free} free")

    @staticmethod
    def _target(request: ev.RefactorPipeline, spec: ModelSpec, names: list[str]) -> Layout:
        try:
            if request.layout:
                return Layout.from_spec(request.layout, names)
            if not request.num_stages or request.num_stages < 1:
                raise RefactorRefused("give a stage count >= 1 or a layout")
            return partition_model(spec, request.num_stages, spec.max_position_embeddings // 2)
        except RefactorRefused:
            raise
        except FlexPipeError as exc:
            raise RefactorRefused(f"bad target: {exc}") from exc

