"""The allocator actor: keeps every pipeline's reservations and answers placement requests.

Where stages go is decided by the pure search in ``controlplane.stage_placement`` (re-exported
here: ``place``, ``place_pinned``, ``PlacementError`` and its constants); the actor supplies what
it knows — reserved bytes, devices shared with other pipelines or other tenants, the pipeline's CV
and the servers that recently hosted the pipeline (their host memory still caches its weights).
"""

from __future__ import annotations

from typing import ClassVar

from common import events as ev
from common.topology import Device, ResourceGraph
from controlplane.actor import Action, Log, Send
from controlplane.stage_placement import (
    AFFINITY_DECAY_PER_S,
    AFFINITY_IDLE_DEVICE_WEIGHT,
    AFFINITY_MAX_AGE_S,
    AFFINITY_RECENCY_WEIGHT,
    ALPHA,
    GAMMA0,
    LINK_COST,
    PLACEMENT_DEADLINE_S,
    PlacementError,
    gamma_of,
    gib,
    place,
    place_pinned,
)

__all__ = [
    "AFFINITY_DECAY_PER_S",
    "AFFINITY_IDLE_DEVICE_WEIGHT",
    "AFFINITY_MAX_AGE_S",
    "AFFINITY_RECENCY_WEIGHT",
    "ALPHA",
    "Allocator",
    "GAMMA0",
    "LINK_COST",
    "PLACEMENT_DEADLINE_S",
    "PlacementError",
    "gamma_of",
    "gib",
    "place",
    "place_pinned",
]


class Allocator:
    """Keeps the resource graph and every pipeline's reservations; answers placement requests.

    Invariants: a pipeline holds at most one reservation (placing it again first releases
    the old one), plus, while a refactor of it runs, a hold on what its target adds; reserved
    and held bytes on a device never exceed its free memory; a lost device is never chosen;
    a refusal leaves all reservations as they were.

    ``tenants[d]``: other tenants' pods on device d (``common.topology.fragment_with_pods``),
    counted as sharing d like another pipeline (Eq. 9). ``hosted[m][server]``: when a pipeline of
    model m (``PlaceStages.model``; the pipeline id when none is named) last had a stage on that server
    (recorded when its reservation leaves the server, or by ``note_hosted``); placing a pipeline of m
    prefers those servers and those its other replicas hold now (Eq. 13).
    """

    name: ClassVar[str] = "allocator"
    accepts: ClassVar[tuple[type, ...]] = (
        ev.RegisterWorker,
        ev.WorkerLost,
        ev.PlaceStages,
        ev.ReleasePlacement,
        ev.PipelineReshaped,
        ev.RefactorHold,
    )

    def __init__(
        self, graph: ResourceGraph | None = None, cv: float = 0.0, tenants: dict[str, int] | None = None
    ) -> None:
        self.graph = graph or ResourceGraph()
        self.cv = cv
        self.tenants: dict[str, int] = dict(tenants or {})
        self.reservations: dict[str, dict[str, int]] = {}
        self.holds: dict[str, dict[str, int]] = {}
        self.hosted: dict[str, dict[str, float]] = {}
        self.model_of: dict[str, str] = {}  # pipeline id -> the model whose weights its servers cache

    def _model(self, pipeline_id: str) -> str:
        return self.model_of.get(pipeline_id, pipeline_id)

    def note_hosted(self, pipeline_id: str, server: str, now: float) -> None:
        """``server`` hosted ``pipeline_id`` until ``now`` (seconds) and still caches its model's weights."""
        hosts = self.hosted.setdefault(self._model(pipeline_id), {})
        hosts[server] = max(now, hosts.get(server, now))
        for stale in [s for s, at in hosts.items() if now - at > AFFINITY_MAX_AGE_S]:
            del hosts[stale]

    def warm_servers(self, pipeline_id: str, now: float) -> dict[str, float]:
        """Server -> when it last hosted the pipeline's model; servers a pipeline of that model holds now count as
        hosting it at ``now``."""
        model = self._model(pipeline_id)
        warm = dict(self.hosted.get(model, {}))
        for owner, devices in self.reservations.items():
            if self._model(owner) == model:
                warm.update(dict.fromkeys(self._servers_of(devices), now))
        return warm

    def _servers_of(self, devices) -> set[str]:
        return {self.graph.devices[d].server for d in devices if d in self.graph.devices}

    def _remember_hosts(self, pipeline_id: str, devices, now: float) -> None:
        for server in self._servers_of(devices):
            self.note_hosted(pipeline_id, server, now)

    def handle(self, event, now: float) -> list[Action]:
        handlers = {
            ev.RegisterWorker: self._on_register_worker,
            ev.WorkerLost: self._on_worker_lost,
            ev.PlaceStages: self._on_place_stages,
            ev.ReleasePlacement: self._on_release_placement,
            ev.PipelineReshaped: self._on_pipeline_reshaped,
            ev.RefactorHold: self._on_refactor_hold,
        }
        return handlers[type(event)](event, now)

    def _on_register_worker(self, event: ev.RegisterWorker, now: float) -> list[Action]:
        info = event.device
        self.graph.add_device(
            Device(
                info.device_id,
                info.kind,
                info.name,
                info.memory_total,
                info.memory_free,
                info.host,
                info.rack,
                frozenset(info.nvlink_peers),
            )
        )
        return []

    def _on_worker_lost(self, event: ev.WorkerLost, now: float) -> list[Action]:
        self.graph.remove_device(event.worker_id)
        return []

    def _on_release_placement(self, event: ev.ReleasePlacement, now: float) -> list[Action]:
        self._remember_hosts(event.pipeline_id, self.reservations.pop(event.pipeline_id, {}), now)
        self.holds.pop(event.pipeline_id, None)
        return []

    def _on_refactor_hold(self, event: ev.RefactorHold, now: float) -> list[Action]:
        current = self.reservations.get(event.pipeline_id, {})
        target = _bytes_per_worker(event.workers, event.stage_memory)
        hold = {w: m - current.get(w, 0) for w, m in target.items() if m > current.get(w, 0)}
        if hold:
            self.holds[event.pipeline_id] = hold
        else:
            self.holds.pop(event.pipeline_id, None)
        return []

    def _on_pipeline_reshaped(self, event: ev.PipelineReshaped, now: float) -> list[Action]:
        """A refactor moved the pipeline: its reservation follows the new stages."""
        self.holds.pop(event.pipeline_id, None)
        if event.pipeline_id in self.reservations and len(event.stage_memory) == len(event.workers):
            self._remember_hosts(event.pipeline_id, self.reservations[event.pipeline_id], now)
            self.reservations[event.pipeline_id] = _bytes_per_worker(event.workers, event.stage_memory)
        return []

    def _on_place_stages(self, event: ev.PlaceStages, now: float) -> list[Action]:
        if event.model:
            self.model_of[event.pipeline_id] = event.model
        warm = self.warm_servers(event.pipeline_id, now)
        previous = self.reservations.pop(event.pipeline_id, None)
        reserved, shared = self._totals()
        try:
            if event.workers:
                devices = place_pinned(self.graph, list(event.stage_memory), list(event.workers), reserved)
            else:
                devices = place(
                    self.graph,
                    list(event.stage_memory),
                    reserved,
                    shared=shared,
                    cv=self.cv,
                    tenants=self.tenants,
                    warm=warm,
                    now=now,
                )
        except PlacementError as error:
            if previous is not None:
                self.reservations[event.pipeline_id] = previous
            return [
                Send(
                    event.sender,
                    ev.PlacementDecided(
                        sender=self.name,
                        reply_to=event.cmd_id,
                        pipeline_id=event.pipeline_id,
                        devices=[],
                        reason=str(error),
                    ),
                ),
                Log("allocator.refused", {"pipeline_id": event.pipeline_id, "reason": str(error)}, level="warning"),
            ]
        if previous is not None:
            self._remember_hosts(event.pipeline_id, previous, now)
        self.reservations[event.pipeline_id] = {d: m for d, m in zip(devices, event.stage_memory)}
        return [
            Send(
                event.sender,
                ev.PlacementDecided(
                    sender=self.name, reply_to=event.cmd_id, pipeline_id=event.pipeline_id, devices=devices
                ),
            ),
            Log(
                "allocator.placed",
                {"pipeline_id": event.pipeline_id, "devices": devices, "stage_memory": list(event.stage_memory)},
            ),
        ]

    def fits(self, stage_memory: list[int], pipeline_id: str = "") -> str:
        """Why stages of ``stage_memory`` bytes could not be placed now ("" when they could), as if
        ``pipeline_id``'s own reservation were free; reserves nothing (the policy asks before it decides)."""
        reserved, shared = self._totals(ignoring=pipeline_id)
        try:
            place(self.graph, list(stage_memory), reserved, shared=shared, cv=self.cv, tenants=self.tenants)
        except PlacementError as error:
            return str(error)
        return ""

    def _totals(self, ignoring: str = "") -> tuple[dict[str, int], dict[str, int]]:
        """Bytes reserved or held per device, and how many pipelines use each device (``ignoring`` one)."""
        reserved: dict[str, int] = {}
        shared: dict[str, int] = {}
        for pipeline_id in (self.reservations.keys() | self.holds.keys()) - {ignoring}:
            holdings, held = self.reservations.get(pipeline_id, {}), self.holds.get(pipeline_id, {})
            for device in holdings.keys() | held.keys():
                reserved[device] = reserved.get(device, 0) + holdings.get(device, 0) + held.get(device, 0)
                shared[device] = shared.get(device, 0) + 1
        return reserved, shared


def _bytes_per_worker(workers: list[str], stage_memory: list[int]) -> dict[str, int]:
    """Each worker's total over the stages it is given."""
    totals: dict[str, int] = {}
    for worker, memory in zip(workers, stage_memory):
        totals[worker] = totals.get(worker, 0) + memory
    return totals
