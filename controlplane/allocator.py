"""The allocator: one device per pipeline stage on the resource graph, and the actor that keeps reservations.

Placement (``place``) looks for the tightest scope that holds the whole pipeline:

1. one server — every server is tried; inside it stages take devices largest-first,
   each the smallest device that still fits (best fit keeps big fragments for later
   pipelines and never misses a one-to-one fit that exists); among servers that fit,
   the cheapest wins: devices already shared with other pipelines cost
   gamma(CV) = gamma0 * (1 + alpha * CV^2) each (FlexPipe Eq. 9), NVLink between
   consecutive stages is cheaper than PCIe;
2. one rack, then the whole cluster — stages are laid out in order, filling one server
   before moving to the next (servers with the most free memory first), so consecutive
   stages share a server wherever they can and cross the network as few times as possible.

Each server is visited a bounded number of times, so thousands of devices take milliseconds.
"""

from __future__ import annotations

from typing import ClassVar

from common import events as ev
from common.errors import FlexPipeError
from common.topology import Device, ResourceGraph
from controlplane.actor import Action, Log, Send

GAMMA0 = 1.0
ALPHA = 0.5
LINK_COST = {"nvlink": 0.0, "pcie": 0.1, "network": 1.0, "cross_rack": 2.0}


class PlacementError(FlexPipeError):
    """No placement satisfies memory and the one-stage-per-device rule; the message says why."""


def gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def place(
    graph: ResourceGraph,
    stage_memory: list[int],
    reserved: dict[str, int],
    *,
    exclude: frozenset[str] | set[str] = frozenset(),
    shared: dict[str, int] | None = None,
    cv: float = 0.0,
) -> list[str]:
    """Device ids for stages 0..K-1 (see the module docstring); raises PlacementError with the reason."""
    shared = shared or {}
    free = {
        d.device_id: d.memory_free - reserved.get(d.device_id, 0)
        for d in graph.devices.values()
        if d.device_id not in exclude
    }
    _check_feasible(stage_memory, free)
    gamma = GAMMA0 * (1 + ALPHA * cv * cv)
    best: tuple[float, list[str]] | None = None
    for members in graph.servers.values():
        choice = _fit_on(stage_memory, [m for m in members if m in free], free)
        if choice is not None:
            cost = _cost(graph, choice, shared, gamma)
            if best is None or cost < best[0]:
                best = (cost, choice)
    if best is not None:
        return best[1]
    for rack_servers in sorted(graph.racks.values(), key=lambda servers: -_capacity(graph, servers, free)):
        choice = _spread(graph, stage_memory, rack_servers, free)
        if choice is not None:
            return choice
    choice = _spread(graph, stage_memory, list(graph.servers), free)
    if choice is None:
        raise PlacementError(
            f"no assignment of {len(stage_memory)} stages needing "
            f"{', '.join(gib(m) for m in stage_memory)} fits the free device memory"
        )
    return choice


def place_pinned(
    graph: ResourceGraph, stage_memory: list[int], workers: list[str], reserved: dict[str, int]
) -> list[str]:
    """Check that stage k fits on ``workers[k]`` (distinct, known, with the free memory); returns ``workers``.
    Raises PlacementError naming the first stage that does not fit."""
    if len(set(workers)) != len(workers):
        raise PlacementError(f"stages must go to distinct devices, got {workers}")
    for stage, (device_id, need) in enumerate(zip(workers, stage_memory)):
        device = graph.devices.get(device_id)
        if device is None:
            raise PlacementError(f"stage {stage} is pinned to {device_id!r}, which is not an alive device")
        free = device.memory_free - reserved.get(device_id, 0)
        if need > free:
            raise PlacementError(f"stage {stage} needs {gib(need)}; {device_id} has {gib(free)} free")
    return list(workers)


def _check_feasible(stage_memory: list[int], free: dict[str, int]) -> None:
    if len(stage_memory) > len(free):
        raise PlacementError(
            f"{len(stage_memory)} stages need {len(stage_memory)} distinct devices; only {len(free)} are available"
        )
    largest = max(free.values(), default=0)
    for stage, need in enumerate(stage_memory):
        if need > largest:
            raise PlacementError(f"stage {stage} needs {gib(need)}; the largest free device fragment is {gib(largest)}")


def _fit_on(stage_memory: list[int], devices: list[str], free: dict[str, int]) -> list[str] | None:
    """Best-fit, largest stage first, onto ``devices``; None if some stage finds no device."""
    if len(devices) < len(stage_memory):
        return None
    unused = sorted(devices, key=lambda d: free[d])
    choice: list[str | None] = [None] * len(stage_memory)
    for stage in sorted(range(len(stage_memory)), key=lambda s: -stage_memory[s]):
        device = next((d for d in unused if free[d] >= stage_memory[stage]), None)
        if device is None:
            return None
        unused.remove(device)
        choice[stage] = device
    return choice  # type: ignore[return-value]


def _spread(
    graph: ResourceGraph, stage_memory: list[int], servers: list[str], free: dict[str, int]
) -> list[str] | None:
    """Stages in order, filling the roomiest server first, then the next; None if they do not all fit."""
    order = sorted(servers, key=lambda s: -_capacity(graph, [s], free))
    choice: list[str] = []
    for server in order:
        unused = sorted((d for d in graph.servers[server] if d in free), key=lambda d: free[d])
        while len(choice) < len(stage_memory):
            need = stage_memory[len(choice)]
            device = next((d for d in unused if free[d] >= need), None)
            if device is None:
                break
            unused.remove(device)
            choice.append(device)
        if len(choice) == len(stage_memory):
            return choice
    return None


def _capacity(graph: ResourceGraph, servers: list[str], free: dict[str, int]) -> int:
    return sum(free.get(d, 0) for s in servers for d in graph.servers[s])


def _cost(graph: ResourceGraph, choice: list[str], shared: dict[str, int], gamma: float) -> float:
    sharing = gamma * sum(1 for d in choice if shared.get(d, 0) > 0)
    links = sum(LINK_COST[graph.link(a, b).kind] for a, b in zip(choice, choice[1:]))
    return sharing + links


class Allocator:
    """Keeps the resource graph and every pipeline's reservations; answers placement requests.

    Invariants: a pipeline holds at most one reservation (placing it again first releases
    the old one), plus, while a refactor of it runs, a hold on what its target adds; reserved
    and held bytes on a device never exceed its free memory; a lost device is never chosen;
    a refusal leaves all reservations as they were.
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

    def __init__(self, graph: ResourceGraph | None = None, cv: float = 0.0) -> None:
        self.graph = graph or ResourceGraph()
        self.cv = cv
        self.reservations: dict[str, dict[str, int]] = {}
        self.holds: dict[str, dict[str, int]] = {}

    def handle(self, event, now: float) -> list[Action]:
        handlers = {
            ev.RegisterWorker: self._on_register_worker,
            ev.WorkerLost: self._on_worker_lost,
            ev.PlaceStages: self._on_place_stages,
            ev.ReleasePlacement: self._on_release_placement,
            ev.PipelineReshaped: self._on_pipeline_reshaped,
            ev.RefactorHold: self._on_refactor_hold,
        }
        return handlers[type(event)](event)

    def _on_register_worker(self, event: ev.RegisterWorker) -> list[Action]:
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

    def _on_worker_lost(self, event: ev.WorkerLost) -> list[Action]:
        self.graph.remove_device(event.worker_id)
        return []

    def _on_release_placement(self, event: ev.ReleasePlacement) -> list[Action]:
        self.reservations.pop(event.pipeline_id, None)
        self.holds.pop(event.pipeline_id, None)
        return []

    def _on_refactor_hold(self, event: ev.RefactorHold) -> list[Action]:
        current = self.reservations.get(event.pipeline_id, {})
        target = _bytes_per_worker(event.workers, event.stage_memory)
        hold = {w: m - current.get(w, 0) for w, m in target.items() if m > current.get(w, 0)}
        if hold:
            self.holds[event.pipeline_id] = hold
        else:
            self.holds.pop(event.pipeline_id, None)
        return []

    def _on_pipeline_reshaped(self, event: ev.PipelineReshaped) -> list[Action]:
        """A refactor moved the pipeline: its reservation follows the new stages."""
        self.holds.pop(event.pipeline_id, None)
        if event.pipeline_id in self.reservations and len(event.stage_memory) == len(event.workers):
            self.reservations[event.pipeline_id] = _bytes_per_worker(event.workers, event.stage_memory)
        return []

    def _on_place_stages(self, event: ev.PlaceStages) -> list[Action]:
        previous = self.reservations.pop(event.pipeline_id, None)
        reserved, shared = self._totals()
        try:
            if event.workers:
                devices = place_pinned(self.graph, list(event.stage_memory), list(event.workers), reserved)
            else:
                devices = place(self.graph, list(event.stage_memory), reserved, shared=shared, cv=self.cv)
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

    def _totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Bytes reserved or held per device, and how many pipelines use each device."""
        reserved: dict[str, int] = {}
        shared: dict[str, int] = {}
        for pipeline_id in self.reservations.keys() | self.holds.keys():
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
