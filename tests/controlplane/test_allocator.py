"""The allocator: placement rules on the resource graph, and the actor's reservations — no sockets."""

from pathlib import Path

import pytest

from common import events as ev
from common.topology import Device, ResourceGraph, graph_from_alibaba_trace
from controlplane.actor import Log, Send
from controlplane.allocator import Allocator, PlacementError, place

GIB = 1 << 30
ALIBABA_NODES = Path(__file__).resolve().parents[1] / "data" / "alibaba_gpu_v2023" / "openb_node_list_gpu_node.csv"


def graph_of(*devices: tuple) -> ResourceGraph:
    graph = ResourceGraph()
    for device_id, free_gib, server, *rest in devices:
        rack = rest[0] if rest else "r0"
        nvlink = frozenset(rest[1]) if len(rest) > 1 else frozenset()
        graph.add_device(Device(device_id, "gpu", "test", 80 * GIB, free_gib * GIB, server, rack, nvlink))
    return graph


def test_every_stage_fits_and_no_device_holds_two_stages():
    graph = graph_of(("a", 10, "s1"), ("b", 30, "s1"), ("c", 20, "s1"))
    devices = place(graph, [25 * GIB, 15 * GIB, 5 * GIB], {})
    assert devices == ["b", "c", "a"]
    with pytest.raises(PlacementError, match="3 stages need 3 distinct devices; only 2"):
        place(graph_of(("a", 10, "s1"), ("b", 10, "s1")), [GIB] * 3, {})
    with pytest.raises(PlacementError, match="stage 1 needs 40.0 GiB; the largest free device fragment is 30.0 GiB"):
        place(graph, [GIB, 40 * GIB], {})


def test_best_fit_finds_the_one_assignment_that_exists():
    graph = graph_of(("big", 30, "s1"), ("small", 10, "s1"))
    assert place(graph, [8 * GIB, 25 * GIB], {}) == ["small", "big"]
    with pytest.raises(PlacementError, match="fits the free device memory"):
        place(graph, [25 * GIB, 25 * GIB], {})


def test_reservations_and_exclusions_shrink_what_is_free():
    graph = graph_of(("a", 10, "s1"), ("b", 10, "s1"))
    assert place(graph, [8 * GIB], {"a": 5 * GIB}) == ["b"]
    assert place(graph, [GIB], {}, exclude={"a"}) == ["b"]


def test_one_server_is_preferred_over_spreading():
    graph = graph_of(("x0", 40, "sx"), ("y0", 40, "sy"), ("y1", 40, "sy"))
    assert sorted(place(graph, [10 * GIB, 10 * GIB], {})) == ["y0", "y1"]


def test_nvlink_beats_pcie_and_a_shared_device_costs_more_than_a_slower_link():
    graph = graph_of(
        ("p0", 40, "pcie"), ("p1", 40, "pcie"), ("n0", 40, "nv", "r0", ["n1"]), ("n1", 40, "nv", "r0", ["n0"])
    )
    assert sorted(place(graph, [GIB, GIB], {})) == ["n0", "n1"]
    shared = {"n0": 1}
    assert sorted(place(graph, [GIB, GIB], {}, shared=shared, cv=0.0)) == ["p0", "p1"]


def test_spreading_keeps_consecutive_stages_together_and_prefers_one_rack():
    graph = graph_of(("a0", 20, "sa", "r1"), ("a1", 20, "sa", "r1"), ("b0", 20, "sb", "r1"), ("c0", 60, "sc", "r2"))
    devices = place(graph, [15 * GIB, 15 * GIB, 15 * GIB], {})
    assert set(devices) == {"a0", "a1", "b0"}, "the rack that holds the whole pipeline"
    assert [graph.devices[d].server for d in devices] == ["sa", "sa", "sb"]


def test_placement_on_the_alibaba_cluster():
    graph = graph_from_alibaba_trace(ALIBABA_NODES)
    devices = place(graph, [10 * GIB] * 8, {})
    assert len(set(devices)) == 8 and all(graph.devices[d].memory_free >= 10 * GIB for d in devices)
    assert len({graph.devices[d].server for d in devices}) == 1, "8 GPUs of one node exist in the trace"
    spread = place(graph, [10 * GIB] * 12, {})
    assert len(set(spread)) == 12


def register(allocator: Allocator, worker_id: str, free_gib: int, host: str = "h1"):
    device = ev.DeviceInfo(
        device_id=worker_id,
        kind="cpu",
        name="virtual",
        memory_total=free_gib * GIB,
        memory_free=free_gib * GIB,
        host=host,
    )
    return allocator.handle(
        ev.RegisterWorker(sender=worker_id, cmd_id=1, worker_id=worker_id, host=host, pid=1, device=device), 0.0
    )


def request(allocator: Allocator, pipeline_id: str, gib_each: list[int], cmd_id: int = 1):
    return allocator.handle(
        ev.PlaceStages(
            sender="coordinator", cmd_id=cmd_id, pipeline_id=pipeline_id, stage_memory=[g * GIB for g in gib_each]
        ),
        0.0,
    )


def decision(actions) -> ev.PlacementDecided:
    (send,) = [a for a in actions if isinstance(a, Send)]
    assert send.peer == "coordinator"
    return send.event


def test_the_actor_reserves_refuses_and_releases():
    allocator = Allocator()
    assert register(allocator, "w0", 10) == [] and register(allocator, "w1", 10) == []
    placed = request(allocator, "p1", [6, 6], cmd_id=4)
    assert decision(placed).devices in (["w0", "w1"], ["w1", "w0"]) and decision(placed).reply_to == 4
    assert [a.name for a in placed if isinstance(a, Log)] == ["allocator.placed"]
    refused = request(allocator, "p2", [6], cmd_id=5)
    assert decision(refused).devices == [] and "largest free device fragment is 4.0 GiB" in decision(refused).reason
    assert [a.name for a in refused if isinstance(a, Log)] == ["allocator.refused"]
    allocator.handle(ev.ReleasePlacement(sender="coordinator", pipeline_id="p1"), 0.0)
    assert decision(request(allocator, "p2", [6], cmd_id=6)).devices


def test_replacing_keeps_the_old_reservation_when_the_new_one_does_not_fit():
    allocator = Allocator()
    register(allocator, "w0", 10)
    request(allocator, "p1", [6])
    assert decision(request(allocator, "p1", [9], cmd_id=2)).devices == ["w0"], (
        "its own old reservation is released first"
    )
    assert decision(request(allocator, "p1", [11], cmd_id=3)).devices == []
    assert decision(request(allocator, "p2", [2], cmd_id=4)).devices == [], "p1 still holds 9 GiB"


def test_a_lost_device_is_never_chosen_and_a_returning_one_is():
    allocator = Allocator()
    register(allocator, "w0", 10)
    allocator.handle(ev.WorkerLost(sender="monitor", worker_id="w0", silent_for_s=3.0), 0.0)
    assert "only 0 are available" in decision(request(allocator, "p", [1])).reason
    register(allocator, "w0", 10)
    assert decision(request(allocator, "p", [1], cmd_id=2)).devices == ["w0"]


def test_a_running_refactor_holds_its_new_workers_until_it_commits_or_aborts():
    allocator = Allocator()
    for worker in ("w0", "w1", "w2"):
        register(allocator, worker, 10)
    assert sorted(decision(request(allocator, "p1", [6, 6])).devices) == ["w0", "w1"]
    hold = ev.RefactorHold(
        sender="refactor_executor", pipeline_id="p1", workers=["w0", "w2"], stage_memory=[8 * GIB, 6 * GIB]
    )
    allocator.handle(hold, 0.0)
    assert allocator.holds["p1"] == {"w0": 2 * GIB, "w2": 6 * GIB}, "only what the target adds is held"
    assert decision(request(allocator, "p2", [5], cmd_id=2)).devices == [], "the refactor's new worker is not free"

    allocator.handle(ev.RefactorHold(sender="refactor_executor", pipeline_id="p1"), 0.0)  # aborted
    assert "p1" not in allocator.holds and decision(request(allocator, "p2", [5], cmd_id=4)).devices == ["w2"]
    allocator.handle(ev.ReleasePlacement(sender="coordinator", pipeline_id="p2"), 0.0)

    allocator.handle(hold, 0.0)
    allocator.handle(
        ev.PipelineReshaped(
            sender="refactor_executor",
            pipeline_id="p1",
            epoch=1,
            workers=["w0", "w2"],
            stage_units=[["embed"], ["head"]],
            stage_inboxes=["a", "b"],
            stage_memory=[8 * GIB, 6 * GIB],
        ),
        0.0,
    )
    assert "p1" not in allocator.holds and allocator.reservations["p1"] == {"w0": 8 * GIB, "w2": 6 * GIB}
    assert decision(request(allocator, "p2", [5], cmd_id=5)).devices == ["w1"], "the committed refactor freed w1"


def test_pinned_stages_are_checked_and_reserved_not_chosen():
    allocator = Allocator()
    for worker, memory in (("w0", 8 * GIB), ("w1", 2 * GIB)):
        allocator.handle(
            ev.RegisterWorker(
                sender=worker,
                cmd_id=1,
                worker_id=worker,
                host="h",
                pid=1,
                device=ev.DeviceInfo(
                    device_id=worker, kind="cpu", name="virtual", memory_total=memory, memory_free=memory, host="h"
                ),
            ),
            0.0,
        )
    (reply,) = allocator.handle(
        ev.PlaceStages(sender="c", cmd_id=2, pipeline_id="p1", stage_memory=[GIB, GIB], workers=["w1", "w0"]), 0.0
    )[:1]
    assert reply.event.devices == ["w1", "w0"] and allocator.reservations["p1"] == {"w1": GIB, "w0": GIB}
    (refused,) = allocator.handle(
        ev.PlaceStages(sender="c", cmd_id=3, pipeline_id="p2", stage_memory=[2 * GIB], workers=["w1"]), 0.0
    )[:1]
    assert refused.event.devices == [] and "w1 has 1.0 GiB free" in refused.event.reason
    (unknown,) = allocator.handle(
        ev.PlaceStages(sender="c", cmd_id=4, pipeline_id="p3", stage_memory=[1], workers=["w9"]), 0.0
    )[:1]
    assert "not an alive device" in unknown.event.reason and set(allocator.reservations) == {"p1"}


def two_nvlink_servers() -> ResourceGraph:
    return graph_of(
        ("a0", 40, "sa", "r0", ["a1"]),
        ("a1", 40, "sa", "r0", ["a0"]),
        ("b0", 40, "sb", "r0", ["b1"]),
        ("b1", 40, "sb", "r0", ["b0"]),
    )


def test_a_warm_server_wins_unless_the_pipeline_is_bursty_and_the_server_shared():
    graph, pair = two_nvlink_servers(), [GIB, GIB]
    assert sorted(place(graph, pair, {})) == ["a0", "a1"], "cold: the first of two equal servers"
    assert sorted(place(graph, pair, {}, warm={"sb": 90.0}, now=100.0)) == ["b0", "b1"]
    tenants = {"b0": 1}
    steady = place(graph, pair, {}, tenants=tenants, warm={"sb": 90.0}, now=100.0, cv=0.0)
    assert sorted(steady) == ["b0", "b1"], "gamma(0) = 1: the cached weights are worth one shared device"
    bursty = place(graph, pair, {}, tenants=tenants, warm={"sb": 90.0}, now=100.0, cv=2.0)
    assert sorted(bursty) == ["a0", "a1"], "gamma(2) = 3: isolation is worth more, and no half-warm spread"
    assert sorted(place(graph, pair, {}, warm={"sb": 0.0}, now=86400.0)) == ["a0", "a1"], "a day old: evicted"


def test_a_spent_time_bound_still_tries_one_placement_and_says_so_when_it_fails():
    graph = two_nvlink_servers()
    assert len(set(place(graph, [GIB] * 3, {}, deadline_s=0.0))) == 3
    tight = graph_of(("a0", 10, "sa"), ("b0", 4, "sb"))
    with pytest.raises(PlacementError, match="cut short by its 0 ms time bound"):
        place(tight, [8 * GIB, 8 * GIB], {}, deadline_s=0.0)
    with pytest.raises(PlacementError, match="fits the free device memory$"):
        place(tight, [8 * GIB, 8 * GIB], {}, deadline_s=None)


def test_the_actor_counts_tenants_as_sharing_and_remembers_where_a_pipeline_ran():
    allocator = Allocator(two_nvlink_servers(), cv=2.0, tenants={"a0": 1})
    assert sorted(decision(request(allocator, "p1", [1, 1])).devices) == ["b0", "b1"], "a0 holds another tenant"
    allocator.handle(ev.ReleasePlacement(sender="coordinator", pipeline_id="p1"), 50.0)
    assert allocator.warm_servers("p1", 60.0) == {"sb": 50.0}
    allocator.note_hosted("p2", "sa", 0.0)
    allocator.note_hosted("p2", "sb", 5000.0)
    assert allocator.hosted["p2"] == {"sb": 5000.0}, "a host copy older than the affinity window is forgotten"


def test_a_new_replica_prefers_a_server_where_its_model_is_cached():
    graph = ResourceGraph()
    for server in ("sa", "sb"):
        for g in range(2):
            graph.add_device(Device(f"{server}-gpu{g}", "gpu", "A10", 24 << 30, 24 << 30, server, "rack0"))
    allocator = Allocator(graph)

    def place(pipeline_id: str, model: str, workers=()) -> list[str]:
        asked = ev.PlaceStages(
            sender="c", cmd_id=1, pipeline_id=pipeline_id, stage_memory=[8 << 30], model=model, workers=list(workers)
        )
        return next(a.event.devices for a in allocator.handle(asked, 100.0) if isinstance(a, Send))

    cold_choice = place("probe", "/models/other")[0]
    allocator.handle(ev.ReleasePlacement(pipeline_id="probe"), 100.0)
    elsewhere = "sb-gpu0" if cold_choice.startswith("sa") else "sa-gpu0"
    place("p0", "/models/m", workers=[elsewhere])  # the model ran on the server a cold placement would not pick
    allocator.handle(ev.ReleasePlacement(pipeline_id="p0"), 110.0)
    assert place("p0-r1", "/models/m")[0].split("-")[0] == elsewhere.split("-")[0]
    assert place("q", "/models/unrelated")[0].split("-")[0] == cold_choice.split("-")[0]
