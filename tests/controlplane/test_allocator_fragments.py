"""The allocator on the Alibaba GPU cluster (6,212 GPUs) fragmented by the trace's own Running pods.

Every placement is checked from the graph and the pod record alone — never with the allocator's
own code: distinct devices, each stage within its device's free memory less what is reserved,
excluded and lost devices unused; and the policies: a higher CV never puts more stages on devices
other tenants use (Eq. 9), warm servers win when they fit (Eq. 13), refusals change nothing, and
a tiny time bound still answers with a valid placement or a clear error (timings never asserted).
"""

import itertools
import random
from pathlib import Path

import pytest

from common import events as ev
from common.topology import FragmentedCluster, fragment_with_pods, graph_from_alibaba_trace
from controlplane.actor import Send
from controlplane.allocator import Allocator, PlacementError, place

GIB = 1 << 30
DATA = Path(__file__).resolve().parents[1] / "data" / "alibaba_gpu_v2023"
MODEL_GIB = {"7B": 13.5, "13B": 26.0, "66B": 123.0}  # fp16 weights
CVS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


def fragmented() -> FragmentedCluster:
    graph = graph_from_alibaba_trace(DATA / "openb_node_list_gpu_node.csv")
    return fragment_with_pods(graph, DATA / "openb_pod_list_default.csv")


@pytest.fixture(scope="module")
def cluster() -> FragmentedCluster:
    """Shared by tests that never change the graph (only reservations, kept outside it)."""
    return fragmented()


def stages(k: int, model: str = "7B", kv_gib: float = 1.0, seed: int = 0) -> list[int]:
    """The model's weights split into k equal stages, each with a KV budget of kv_gib +- 25 %."""
    rng = random.Random(seed)
    return [int((MODEL_GIB[model] / k + kv_gib * rng.uniform(0.75, 1.25)) * GIB) for _ in range(k)]


def assert_valid(graph, devices: list[str], memory: list[int], reserved=None, exclude=frozenset()) -> None:
    reserved = reserved or {}
    assert len(devices) == len(memory)
    assert len(set(devices)) == len(devices), "one stage per device"
    for device_id, need in zip(devices, memory):
        assert device_id in graph.devices, f"{device_id} is not an alive device"
        assert device_id not in exclude, f"{device_id} is excluded"
        assert need <= graph.devices[device_id].memory_free - reserved.get(device_id, 0), f"{device_id} overfull"


def on_tenant_devices(cluster: FragmentedCluster, devices: list[str]) -> int:
    return sum(1 for d in devices if cluster.tenants.get(d, 0) > 0)


def servers_of(graph, devices) -> set[str]:
    return {graph.devices[d].server for d in devices}


def idle_servers(cluster: FragmentedCluster, memory: list[int]) -> list[str]:
    """Servers with at least len(memory) tenant-free devices that each hold the largest stage."""
    graph = cluster.graph
    return [
        server
        for server, members in graph.servers.items()
        if sum(1 for d in members if d not in cluster.tenants and graph.devices[d].memory_free >= max(memory))
        >= len(memory)
    ]


def decision(actions) -> ev.PlacementDecided:
    (send,) = [a for a in actions if isinstance(a, Send)]
    return send.event


def request(allocator: Allocator, pipeline_id: str, memory: list[int], now: float = 0.0, cmd_id: int = 1):
    event = ev.PlaceStages(sender="coordinator", cmd_id=cmd_id, pipeline_id=pipeline_id, stage_memory=memory)
    return decision(allocator.handle(event, now))


@pytest.mark.parametrize("k", [4, 8, 32])
@pytest.mark.parametrize("model", ["7B", "13B", "66B"])
def test_a_pipeline_fits_the_fragmented_cluster_at_any_cv(cluster, k, model):
    memory = stages(k, model)
    if max(memory) > 32 * GIB:
        with pytest.raises(PlacementError, match="largest free device fragment is 32.0 GiB"):
            place(cluster.graph, memory, {}, tenants=cluster.tenants)
        return
    for cv in (0.0, 2.0, 8.0):
        devices = place(cluster.graph, memory, {}, tenants=cluster.tenants, cv=cv)
        assert_valid(cluster.graph, devices, memory)


def test_pipelines_placed_one_after_another_never_overfill_a_device(cluster):
    allocator = Allocator(cluster.graph, tenants=cluster.tenants)
    used: dict[str, int] = {}
    rng = random.Random(7)
    placed = 0
    for n in range(60):
        k = (4, 8, 32)[n % 3]
        memory = stages(k, rng.choice(["7B", "13B"]), kv_gib=rng.uniform(0.5, 4.0), seed=n)
        allocator.cv = rng.uniform(0.0, 4.0)
        devices = request(allocator, f"p{n}", memory, cmd_id=n).devices
        if devices:
            assert_valid(cluster.graph, devices, memory, reserved=used)
            for device, need in zip(devices, memory):
                used[device] = used.get(device, 0) + need
            placed += 1
    assert placed == 60
    assert all(used[d] <= cluster.graph.devices[d].memory_free for d in used)


def test_a_crowded_rack_fills_up_to_its_memory_and_then_refuses(cluster):
    graph = cluster.graph
    racks = sorted(graph.racks)[:2]
    inside = {d for r in racks for s in graph.racks[r] for d in graph.servers[s]}
    exclude = set(graph.devices) - inside
    reserved: dict[str, int] = {}
    refused = 0
    for n in range(400):
        memory = stages((4, 8, 32)[n % 3], "13B", kv_gib=2.0, seed=n)
        try:
            devices = place(graph, memory, reserved, exclude=exclude, tenants=cluster.tenants, cv=n % 5)
        except PlacementError:
            refused += 1
            continue
        assert_valid(graph, devices, memory, reserved, exclude)
        for device, need in zip(devices, memory):
            reserved[device] = reserved.get(device, 0) + need
    assert refused > 0, "two racks cannot take 400 pipelines"
    assert all(reserved[d] <= graph.devices[d].memory_free for d in reserved)


def test_lost_and_excluded_devices_are_never_chosen(cluster):
    memory = stages(8)
    first = place(cluster.graph, memory, {}, tenants=cluster.tenants)
    exclude = set(first) | set(random.Random(3).sample(sorted(cluster.graph.devices), 3000))
    for k in (4, 8, 32):
        memory = stages(k)
        assert_valid(cluster.graph, place(cluster.graph, memory, {}, exclude=exclude), memory, exclude=exclude)

    own = fragmented()  # losing workers changes the graph
    allocator = Allocator(own.graph, tenants=own.tenants)
    held = request(allocator, "p1", memory).devices
    lost = {d for s in servers_of(own.graph, held) for d in own.graph.servers[s]}
    for device in sorted(lost):
        allocator.handle(ev.WorkerLost(sender="monitor", worker_id=device, silent_for_s=3.0), 1.0)
    again = request(allocator, "p2", memory, now=2.0).devices
    assert again and not set(again) & lost
    assert_valid(own.graph, again, memory, reserved={d: m for d, m in zip(held, memory) if d in own.graph.devices})


def test_a_higher_cv_never_puts_more_stages_on_tenant_devices(cluster):
    """Few tenant-free devices left: steady pipelines (low CV) share, bursty ones (high CV) isolate (Eq. 9)."""
    untouched = sorted(d for d in cluster.graph.devices if d not in cluster.tenants)
    some_isolation_bought = False
    for k, seed in itertools.product((4, 8, 32), range(4)):
        rng = random.Random(seed)
        keep = set(rng.sample(untouched, rng.choice([k // 2, k, 2 * k])))
        exclude = set(untouched) - keep
        memory = stages(k, seed=seed)
        shared_stages = []
        for cv in CVS:
            devices = place(cluster.graph, memory, {}, exclude=exclude, tenants=cluster.tenants, cv=cv, deadline_s=None)
            assert_valid(cluster.graph, devices, memory, exclude=exclude)
            shared_stages.append(on_tenant_devices(cluster, devices))
        assert shared_stages == sorted(shared_stages, reverse=True), f"k={k} seed={seed}: {shared_stages}"
        some_isolation_bought |= shared_stages[-1] < shared_stages[0]
    assert some_isolation_bought, "somewhere a bursty pipeline paid network hops to avoid other tenants"


@pytest.mark.parametrize("k", [4, 8])
def test_a_warm_server_is_preferred_when_it_fits(cluster, k):
    memory = stages(k)
    cold = place(cluster.graph, memory, {}, tenants=cluster.tenants, deadline_s=None)
    candidates = [s for s in idle_servers(cluster, memory) if s not in servers_of(cluster.graph, cold)]
    for warm_server in (candidates[0], candidates[-1]):
        warm = {warm_server: 1000.0}
        devices = place(cluster.graph, memory, {}, tenants=cluster.tenants, warm=warm, now=1060.0, deadline_s=None)
        assert_valid(cluster.graph, devices, memory)
        assert servers_of(cluster.graph, devices) == {warm_server}
    long_ago = {candidates[0]: 0.0}
    forgotten = place(cluster.graph, memory, {}, tenants=cluster.tenants, warm=long_ago, now=86400.0, deadline_s=None)
    assert forgotten == cold, "a copy a day old counts as evicted"


def test_a_warm_server_that_cannot_take_the_pipeline_still_yields_a_valid_one(cluster):
    graph = cluster.graph
    small = next(s for s, members in graph.servers.items() if len(members) == 2)
    for k in (4, 32):
        memory = stages(k)
        devices = place(graph, memory, {}, tenants=cluster.tenants, warm={small: 0.0}, now=10.0)
        assert_valid(graph, devices, memory)


def test_the_actor_sends_a_pipeline_back_to_the_servers_that_cached_it(cluster):
    allocator = Allocator(cluster.graph, tenants=cluster.tenants)
    memory = stages(8)  # a whole server
    first = request(allocator, "a", memory, now=0.0).devices
    second = request(allocator, "b", memory, now=0.0, cmd_id=2).devices
    assert servers_of(cluster.graph, first) != servers_of(cluster.graph, second)
    for pipeline in ("a", "b"):
        allocator.handle(ev.ReleasePlacement(sender="coordinator", pipeline_id=pipeline), 100.0)
    cold = place(cluster.graph, memory, {}, tenants=cluster.tenants)
    assert servers_of(cluster.graph, cold) == servers_of(cluster.graph, first), "b's servers are not the cold choice"
    back = request(allocator, "b", memory, now=110.0, cmd_id=3).devices
    assert servers_of(cluster.graph, back) == servers_of(cluster.graph, second)


def test_refusals_leave_every_reservation_untouched(cluster):
    allocator = Allocator(cluster.graph, tenants=cluster.tenants)
    for n, k in enumerate((4, 8, 32, 8, 4)):
        assert request(allocator, f"p{n}", stages(k, "13B", seed=n), cmd_id=n).devices
    before = {p: dict(r) for p, r in allocator.reservations.items()}
    impossible = {
        "too big for any device": [40 * GIB] * 4,
        "more stages than devices": [GIB] * 7000,
        "too big in total": [31 * GIB] * 2000,
    }
    for pipeline_id in ("p0", "new"):
        for why, memory in impossible.items():
            reply = request(allocator, pipeline_id, memory, cmd_id=99)
            assert reply.devices == [] and reply.reason, why
            assert allocator.reservations == before, why


@pytest.mark.parametrize("k", [4, 8, 32])
def test_a_tiny_time_bound_still_answers_validly(cluster, k):
    memory = stages(k)
    ticks = itertools.count()
    for bound, clock in ((0.0, None), (1e-9, None), (3.0, lambda: float(next(ticks)))):
        try:
            kwargs = {"clock": clock} if clock else {}
            devices = place(cluster.graph, memory, {}, tenants=cluster.tenants, cv=2.0, deadline_s=bound, **kwargs)
        except PlacementError as error:
            assert "time bound" in str(error)
        else:
            assert_valid(cluster.graph, devices, memory)
    with pytest.raises(PlacementError, match="time bound|fits the free device memory"):
        place(cluster.graph, [31 * GIB] * 2000, {}, tenants=cluster.tenants, deadline_s=0.0)
