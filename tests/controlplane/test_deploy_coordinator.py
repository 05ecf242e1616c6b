"""The coordinator as a state machine: deploy phases, failures, timeouts, loss — no sockets."""

import pytest

from common import events as ev
from controlplane.actor import Log, Send, Tell, Tick
from controlplane.deploy.coordinator import DeployCoordinator
from controlplane.deploy.plan import plan_pipeline


@pytest.fixture
def coordinator():
    c = DeployCoordinator(plan_pipeline, phase_timeout_s=30.0)
    c.handle(
        ev.RegisterEngineHost(sender="e0", cmd_id=1, host_id="e0", host="h", pid=1, request_address="ipc://r"), 0.0
    )
    return c


def deploy(c: DeployCoordinator, model_dir: str, stages: int = 3, pipeline_id: str = "p1", cmd_id: int = 5, **extra):
    return c.handle(
        ev.DeployPipeline(
            sender="op", cmd_id=cmd_id, pipeline_id=pipeline_id, model_dir=model_dir, num_stages=stages, **extra
        ),
        0.0,
    )


def sent(actions, kind):
    return [a for a in actions if isinstance(a, Send) and isinstance(a.event, kind)]


def told(actions, kind):
    return [a for a in actions if isinstance(a, Tell) and isinstance(a.event, kind)]


def states(actions) -> list[str]:
    return [a.event.pipeline.state for a in told(actions, ev.PipelineUpdated)]


def run_to_ready(c: DeployCoordinator, model_dir: str, workers=("w0", "w1", "w2")):
    actions = deploy(c, model_dir, stages=len(workers))
    (place,) = told(actions, ev.PlaceStages)
    actions = c.handle(
        ev.PlacementDecided(sender="allocator", reply_to=place.event.cmd_id, pipeline_id="p1", devices=list(workers)),
        1.0,
    )
    (prepare,) = sent(actions, ev.PrepareEngine)
    actions = c.handle(
        ev.EnginePrepared(sender="e0", reply_to=prepare.event.cmd_id, pipeline_id="p1", inbox_address="ipc://engine"),
        2.0,
    )
    loads = sent(actions, ev.LoadStage)
    connects = []
    for load in reversed(loads):
        actions = c.handle(
            ev.StageLoaded(
                sender=load.peer,
                reply_to=load.event.cmd_id,
                pipeline_id="p1",
                epoch=0,
                stage=load.event.stage,
                inbox_address=f"ipc://stage{load.event.stage}",
                param_bytes=1,
                kv_bytes=1,
                load_seconds=0.1,
            ),
            3.0,
        )
        connects += sent(actions, ev.ConnectStage)
    start = []
    for connect in connects:
        actions = c.handle(ev.Ack(sender=connect.peer, reply_to=connect.event.cmd_id), 4.0)
        start += sent(actions, ev.StartEngine)
    actions = c.handle(ev.Ack(sender="e0", reply_to=start[0].event.cmd_id), 5.0)
    return loads, connects, start, actions


def test_deploy_walks_every_phase_to_ready(coordinator, tiny_model):
    actions = deploy(coordinator, str(tiny_model))
    assert [a.event for a in sent(actions, ev.DeployAccepted)] == [
        ev.DeployAccepted(sender="coordinator", reply_to=5, pipeline_id="p1")
    ]
    (place,) = told(actions, ev.PlaceStages)
    assert len(place.event.stage_memory) == 3 and min(place.event.stage_memory) > 0
    assert states(actions) == ["PLACING"]

    c = DeployCoordinator(plan_pipeline)
    c.handle(ev.RegisterEngineHost(sender="e0", cmd_id=1, host_id="e0", host="h", pid=1, request_address="r"), 0.0)
    loads, connects, start, actions = run_to_ready(c, str(tiny_model))
    assert [(load.peer, load.event.stage) for load in loads] == [("w0", 0), ("w1", 1), ("w2", 2)]
    units = [u for load in loads for u in load.event.units]
    assert units[0] == "embed" and units[-1] == "head" and len(units) == len(set(units)) == 10
    assert [(c_.peer, c_.event.next_address) for c_ in connects] == [
        ("w0", "ipc://stage1"),
        ("w1", "ipc://stage2"),
        ("w2", ""),
    ]
    assert all(c_.event.engine_address == "ipc://engine" for c_ in connects)
    assert start[0].event.first_stage_address == "ipc://stage0"
    assert states(actions) == ["READY"]
    assert c.pipelines["p1"].view().stages[1].worker_id == "w1"


def test_a_refused_placement_fails_the_pipeline_with_the_reason(coordinator, tiny_model):
    actions = deploy(coordinator, str(tiny_model))
    (place,) = told(actions, ev.PlaceStages)
    actions = coordinator.handle(
        ev.PlacementDecided(
            sender="allocator", reply_to=place.event.cmd_id, pipeline_id="p1", devices=[], reason="only 2 devices"
        ),
        1.0,
    )
    assert states(actions) == ["FAILED"]
    assert "only 2 devices" in coordinator.pipelines["p1"].reason
    assert told(actions, ev.ReleasePlacement), "a failed pipeline releases its reservation"
    assert not sent(actions, ev.StopEngine), "no engine was prepared yet"


def test_bad_requests_are_refused_before_anything_moves(coordinator, tiny_model, tmp_path):
    assert sent(deploy(coordinator, str(tmp_path / "missing")), ev.ErrorReply)[0].event.code == "deploy_refused"
    assert "at most" in sent(deploy(coordinator, str(tiny_model), stages=50), ev.ErrorReply)[0].event.message
    deploy(coordinator, str(tiny_model))
    again = sent(deploy(coordinator, str(tiny_model), cmd_id=6), ev.ErrorReply)
    assert "already exists" in again[0].event.message
    no_hosts = DeployCoordinator(plan_pipeline)
    assert "no engine host" in sent(deploy(no_hosts, str(tiny_model)), ev.ErrorReply)[0].event.message
    for transport in ("nccl", "gloo"):
        refused = sent(deploy(coordinator, str(tiny_model), pipeline_id=transport, transport=transport), ev.ErrorReply)
        assert (
            f"the {transport} transport" in refused[0].event.message
            and "use shm, tcp or cuda_ipc" in refused[0].event.message
        )
    pinned = sent(deploy(coordinator, str(tiny_model), pipeline_id="p2", stages=2, workers=["w0"]), ev.ErrorReply)
    assert "1 workers named for 2 stages" in pinned[0].event.message
    assert set(coordinator.pipelines) == {"p1"}


def test_a_pinned_deploy_asks_the_allocator_for_those_workers_and_sizes_the_engine_as_asked(coordinator, tiny_model):
    actions = deploy(
        coordinator,
        str(tiny_model),
        stages=2,
        workers=["w1", "w0"],
        num_kv_blocks=12,
        max_model_len=64,
        max_num_batched_tokens=96,
        step_timeout_s=7.0,
    )
    (place,) = told(actions, ev.PlaceStages)
    assert place.event.workers == ["w1", "w0"]
    actions = coordinator.handle(
        ev.PlacementDecided(sender="allocator", reply_to=place.event.cmd_id, pipeline_id="p1", devices=["w1", "w0"]),
        1.0,
    )
    (prepare,) = sent(actions, ev.PrepareEngine)
    assert prepare.peer == "e0"
    assert (
        prepare.event.num_kv_blocks,
        prepare.event.max_model_len,
        prepare.event.max_num_batched_tokens,
        prepare.event.step_timeout_s,
    ) == (12, 64, 96, 7.0)


def test_a_worker_error_during_load_tears_everything_down(coordinator, tiny_model):
    c = coordinator
    (place,) = told(deploy(c, str(tiny_model)), ev.PlaceStages)
    actions = c.handle(
        ev.PlacementDecided(
            sender="allocator", reply_to=place.event.cmd_id, pipeline_id="p1", devices=["w0", "w1", "w2"]
        ),
        1.0,
    )
    (prepare,) = sent(actions, ev.PrepareEngine)
    loads = sent(
        c.handle(
            ev.EnginePrepared(sender="e0", reply_to=prepare.event.cmd_id, pipeline_id="p1", inbox_address="ipc://e"),
            2.0,
        ),
        ev.LoadStage,
    )
    actions = c.handle(
        ev.ErrorReply(sender="w1", reply_to=loads[1].event.cmd_id, code="command_failed", message="out of memory"), 3.0
    )
    assert states(actions) == ["FAILED"] and "out of memory" in c.pipelines["p1"].reason
    assert sorted(a.peer for a in sent(actions, ev.UnloadStage)) == ["w0", "w1", "w2"]
    assert [a.peer for a in sent(actions, ev.StopEngine)] == ["e0"]
    late = c.handle(
        ev.StageLoaded(
            sender="w0",
            reply_to=loads[0].event.cmd_id,
            pipeline_id="p1",
            epoch=0,
            stage=0,
            inbox_address="x",
            param_bytes=1,
            kv_bytes=1,
            load_seconds=1.0,
        ),
        4.0,
    )
    assert late == [], "a reply after the failure is ignored"


def test_a_phase_that_gets_no_answer_times_out(coordinator, tiny_model):
    deploy(coordinator, str(tiny_model))
    assert coordinator.handle(Tick(29.0), 29.0) == []
    actions = coordinator.handle(Tick(31.0), 31.0)
    assert states(actions) == ["FAILED"]
    assert (
        "PLACING timed out" in coordinator.pipelines["p1"].reason and "allocator" in coordinator.pipelines["p1"].reason
    )


def test_losing_a_worker_degrades_a_ready_pipeline_and_tells_the_engine(tiny_model):
    c = DeployCoordinator(plan_pipeline)
    c.handle(ev.RegisterEngineHost(sender="e0", cmd_id=1, host_id="e0", host="h", pid=1, request_address="r"), 0.0)
    run_to_ready(c, str(tiny_model))
    actions = c.handle(ev.WorkerLost(sender="monitor", worker_id="w1", silent_for_s=3.2), 9.0)
    assert states(actions) == ["DEGRADED"]
    (notice,) = sent(actions, ev.PipelineStateChanged)
    assert notice.peer == "e0" and notice.event.state == "DEGRADED" and "w1" in notice.event.reason
    assert [a.name for a in actions if isinstance(a, Log)] == ["pipeline.state"]
    assert c.handle(ev.WorkerLost(sender="monitor", worker_id="w9", silent_for_s=3.2), 9.0) == []
    assert c.lost == {"w1", "w9"}
    restarted = ev.RegisterWorker(
        sender="w9",
        cmd_id=2,
        worker_id="w9",
        host="h",
        pid=2,
        device=ev.DeviceInfo(
            device_id="w9", kind="cpu", name="virtual", memory_total=1 << 30, memory_free=1 << 30, host="h"
        ),
    )
    assert c.handle(restarted, 10.0) == [] and c.lost == {"w1"}, "a worker that registers again is usable again"


def test_undeploy_unloads_stops_and_removes(tiny_model):
    c = DeployCoordinator(plan_pipeline)
    c.handle(ev.RegisterEngineHost(sender="e0", cmd_id=1, host_id="e0", host="h", pid=1, request_address="r"), 0.0)
    run_to_ready(c, str(tiny_model))
    actions = c.handle(ev.UndeployPipeline(sender="op", cmd_id=9, pipeline_id="p1"), 10.0)
    assert sorted(a.peer for a in sent(actions, ev.UnloadStage)) == ["w0", "w1", "w2"]
    assert sent(actions, ev.Ack)[0].event.reply_to == 9
    assert told(actions, ev.PipelineUpdated)[0].event.removed
    assert "p1" not in c.pipelines
    missing = c.handle(ev.UndeployPipeline(sender="op", cmd_id=10, pipeline_id="p1"), 11.0)
    assert sent(missing, ev.ErrorReply)[0].event.code == "unknown_pipeline"
