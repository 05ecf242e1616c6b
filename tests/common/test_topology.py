"""The resource graph: TOML inventories, links, incremental changes, the Alibaba trace and its pods."""

import csv
from pathlib import Path

import pytest

from common.topology import (
    Device,
    ResourceGraph,
    TopologyError,
    fragment_with_pods,
    graph_from_alibaba_trace,
    load_inventory,
)

REPO = Path(__file__).resolve().parents[2]
ALIBABA_NODES = REPO / "tests" / "data" / "alibaba_gpu_v2023" / "openb_node_list_gpu_node.csv"


def test_the_example_inventory_loads_with_its_links():
    graph = load_inventory(REPO / "scripts" / "inventory.example.toml")
    assert sorted(graph.devices) == ["node-a-gpu0", "node-a-gpu1", "node-b-gpu0"]
    assert graph.devices["node-a-gpu0"].memory_free == 50 << 30 and graph.devices["node-a-gpu1"].memory_free == 80 << 30
    assert graph.link("node-a-gpu0", "node-a-gpu1").kind == "nvlink"
    assert graph.link("node-a-gpu0", "node-b-gpu0").kind == "network"
    assert graph.servers == {"node-a": ["node-a-gpu0", "node-a-gpu1"], "node-b": ["node-b-gpu0"]}


def inventory(tmp_path, devices: str) -> Path:
    path = tmp_path / "inv.toml"
    path.write_text('[[rack]]\nname = "r"\n[[rack.server]]\nname = "s"\n' + devices)
    return path


@pytest.mark.parametrize(
    "devices,message",
    [
        ('[[rack.server.device]]\nkind = "gpu"\nmemory = 1\n', "lacks the field 'id'"),
        ('[[rack.server.device]]\nid = "a"\n', "lacks the field 'memory'"),
        ('[[rack.server.device]]\nid = "a"\nmemory = -4\n', "negative"),
        ('[[rack.server.device]]\nid = "a"\nmemory = "lots"\n', "not a size"),
        (
            '[[rack.server.device]]\nid = "a"\nmemory = 1\n[[rack.server.device]]\nid = "a"\nmemory = 1\n',
            "duplicate device id",
        ),
        ('[[rack.server.device]]\nid = "a"\nmemory = 1\nnvlink = ["ghost"]\n', "NVLink peers"),
        ('[[rack.server.device]]\nid = "a"\nmemory = 1\nfree = 2\n', "free <= total"),
        ('[[rack.server.device]]\nid = "a"\nmemory = 1\nkind = "tpu"\n', "kind must be"),
    ],
)
def test_bad_inventories_say_what_is_wrong(tmp_path, devices, message):
    with pytest.raises(TopologyError, match=message):
        load_inventory(inventory(tmp_path, devices))


def test_unreadable_inventory(tmp_path):
    with pytest.raises(TopologyError, match="cannot read inventory"):
        load_inventory(tmp_path / "missing.toml")


def test_devices_come_and_go_and_a_readded_id_replaces_the_old_one():
    graph = ResourceGraph()
    graph.add_device(Device("d0", "cpu", "virtual", 100, 100, "s1", "r1"))
    graph.add_device(Device("d1", "cpu", "virtual", 100, 100, "s2", "r2"))
    assert graph.link("d0", "d1").kind == "cross_rack"
    graph.add_device(Device("d0", "cpu", "virtual", 50, 50, "s2", "r2"))
    assert graph.servers == {"s2": ["d1", "d0"]} and graph.racks == {"r2": ["s2"]}
    assert graph.link("d0", "d1").kind == "pcie"
    graph.remove_device("d1")
    graph.remove_device("d1")
    assert list(graph.devices) == ["d0"] and graph.servers == {"s2": ["d0"]}


def test_the_alibaba_gpu_cluster_becomes_a_graph():
    graph = graph_from_alibaba_trace(ALIBABA_NODES)
    assert len(graph.devices) == 6212 and len(graph.servers) > 1000
    any_node = next(iter(graph.servers.values()))
    if len(any_node) > 1:
        assert graph.link(any_node[0], any_node[1]).kind == "nvlink"


ALIBABA_PODS = REPO / "tests" / "data" / "alibaba_gpu_v2023" / "openb_pod_list_default.csv"
POD_HEADER = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n"
)


def pod_list(tmp_path, *pods: tuple) -> Path:
    """Pods as (name, num_gpu, gpu_milli, phase, created, deleted, scheduled)."""
    path = tmp_path / "pods.csv"
    rows = [f"{n},1000,1024,{g},{m},,LS,{phase},{c},{d},{s}\n" for n, g, m, phase, c, d, s in pods]
    path.write_text(POD_HEADER + "".join(rows))
    return path


def two_node_graph(tmp_path) -> ResourceGraph:
    nodes = tmp_path / "nodes.csv"
    nodes.write_text("sn,cpu_milli,memory_mib,gpu,model\nn0,1,1,2,V100M32\nn1,1,1,4,T4\n")
    return graph_from_alibaba_trace(nodes)


def test_the_running_pods_of_the_trace_take_their_shares_of_the_cluster():
    graph = graph_from_alibaba_trace(ALIBABA_NODES)
    cluster = fragment_with_pods(graph, ALIBABA_PODS)
    with open(ALIBABA_PODS, newline="") as f:
        running = {r["name"]: r for r in csv.DictReader(f) if r["pod_phase"] == "Running" and int(r["num_gpu"])}
    assert cluster.pods_placed + cluster.pods_unfit == len(running) and cluster.pods_placed > 4000
    assert set(cluster.pod_devices) <= set(running)
    taken: dict[str, int] = {}
    for name, devices in cluster.pod_devices.items():
        pod = running[name]
        assert len(devices) == len(set(devices)) == int(pod["num_gpu"])
        for device in devices:
            taken[device] = taken.get(device, 0) + int(pod["gpu_milli"])
    assert taken == cluster.milli_taken and all(0 < t <= 1000 for t in taken.values()), "shares add up, none over"
    assert cluster.tenants == {d: sum(d in ds for ds in cluster.pod_devices.values()) for d in taken}
    for device_id, device in cluster.graph.devices.items():
        original = graph.devices[device_id]
        assert device.memory_free == original.memory_total - -(-original.memory_total * taken.get(device_id, 0) // 1000)
    assert all(d.memory_free == d.memory_total for d in graph.devices.values()), "the input graph is left as it was"


def test_whole_gpu_pods_take_untouched_gpus_of_one_node():
    cluster = fragment_with_pods(graph_from_alibaba_trace(ALIBABA_NODES), ALIBABA_PODS)
    multi = {name: devices for name, devices in cluster.pod_devices.items() if len(devices) > 1}
    assert len(multi) >= 10
    for devices in multi.values():
        assert len({cluster.graph.devices[d].server for d in devices}) == 1
        assert all(cluster.milli_taken[d] == 1000 and cluster.tenants[d] == 1 for d in devices), "nobody else on them"


def test_pods_that_fit_nowhere_are_counted_and_best_fit_differs_from_first_fit(tmp_path):
    graph = two_node_graph(tmp_path)  # n0: 2 x 32 GiB, n1: 4 x 16 GiB
    pods = pod_list(
        tmp_path,
        ("p-share-a", 1, 300, "Running", 0, 9, 0),
        ("p-whole-4", 4, 1000, "Running", 1, 9, 1),
        ("p-share-b", 1, 800, "Running", 2, 9, 2),
        ("p-share-c", 1, 150, "Running", 3, 9, 3),
        ("p-whole-8", 8, 1000, "Running", 4, 9, 4),
        ("p-too-big", 1, 900, "Running", 5, 9, 5),
        ("p-done", 1, 1000, "Succeeded", 0, 9, 0),
        ("p-cpu", 0, 0, "Running", 0, 9, 0),
    )
    best, first = fragment_with_pods(graph, pods, fit="best"), fragment_with_pods(graph, pods, fit="first")
    for cluster in (best, first):
        assert cluster.pods_unfit == 2 and cluster.pods_placed == 4, "the 8-GPU pod and the 900 share do not fit"
        assert sorted(cluster.pod_devices["p-whole-4"]) == [f"n1-gpu{g}" for g in range(4)]
        assert cluster.pod_devices["p-share-a"] == ["n0-gpu0"] and cluster.pod_devices["p-share-b"] == ["n0-gpu1"]
    assert best.pod_devices["p-share-c"] == ["n0-gpu1"], "best fit: the GPU with the least left over"
    assert first.pod_devices["p-share-c"] == ["n0-gpu0"], "first fit: the first GPU with room"
    assert best.graph.devices["n0-gpu1"].memory_free == (32 << 30) - -(-(32 << 30) * 950 // 1000)
    assert best.tenants == {"n0-gpu0": 1, "n0-gpu1": 2, **{f"n1-gpu{g}": 1 for g in range(4)}}


def test_pods_alive_at_a_time_are_those_scheduled_and_not_yet_deleted(tmp_path):
    graph = two_node_graph(tmp_path)
    pods = pod_list(
        tmp_path,
        ("early", 1, 500, "Succeeded", 0, 10, 0),
        ("now", 1, 500, "Failed", 5, 20, 6),
        ("pending", 1, 500, "Pending", 5, 20, ""),
        ("late", 1, 500, "Running", 15, 30, 15),
    )
    assert set(fragment_with_pods(graph, pods, at_time=8).pod_devices) == {"early", "now"}
    assert set(fragment_with_pods(graph, pods, at_time=10).pod_devices) == {"now"}
    assert set(fragment_with_pods(graph, pods).pod_devices) == {"late"}, "no time: the Running pods"
    with pytest.raises(TopologyError, match="fit must be"):
        fragment_with_pods(graph, pods, fit="worst")
    with pytest.raises(TopologyError, match="cannot read pod list"):
        fragment_with_pods(graph, tmp_path / "missing.csv")


def test_sorted_free_follows_every_change_to_the_graph():
    graph = ResourceGraph()
    graph.add_device(Device("a", "gpu", "x", 100, 70, "s1", "r1"))
    graph.add_device(Device("b", "gpu", "x", 100, 30, "s1", "r1"))
    first = graph.sorted_free()
    assert first["s1"].device_ids == ("b", "a") and first["s1"].free == (30, 70)
    assert graph.sorted_free() is first, "built once per version"
    graph.add_device(Device("a", "gpu", "x", 100, 10, "s1", "r1"))
    assert graph.sorted_free()["s1"].device_ids == ("a", "b")
    graph.remove_device("b")
    assert graph.sorted_free()["s1"].free == (10,)
