"""The monitor as a state machine: events in, actions out, no sockets."""

from common import events as ev
from controlplane.actor import Log, Send, Tell, Tick
from controlplane.monitor import Monitor


def device(worker_id: str, memory: int = 1 << 30) -> ev.DeviceInfo:
    return ev.DeviceInfo(
        device_id=worker_id, kind="cpu", name="virtual", memory_total=memory, memory_free=memory, host="h1"
    )


def register(monitor: Monitor, worker_id: str, now: float, pid: int = 100, cmd_id: int = 1):
    return monitor.handle(
        ev.RegisterWorker(
            sender=worker_id, cmd_id=cmd_id, worker_id=worker_id, host="h1", pid=pid, device=device(worker_id)
        ),
        now,
    )


def log_names(actions) -> list[str]:
    return [a.name for a in actions if isinstance(a, Log)]


def test_registration_is_acknowledged_and_shared_with_the_allocator_and_coordinator():
    monitor = Monitor(heartbeat_interval_s=0.5)
    actions = register(monitor, "w1", now=0.0, cmd_id=7)
    replies = [a for a in actions if isinstance(a, Send)]
    assert replies == [Send("w1", ev.WorkerRegistered(sender="monitor", reply_to=7, heartbeat_interval_s=0.5))]
    assert [a.actor for a in actions if isinstance(a, Tell)] == ["allocator", "coordinator", "refactor_executor"]
    assert log_names(actions) == ["worker.registered"]
    status = monitor.status(reply_to=3, now=0.2)
    assert [(w.worker_id, w.state, w.last_heartbeat_age_s) for w in status.workers] == [("w1", "alive", 0.2)]


def test_a_silent_worker_is_lost_after_three_intervals_and_reported_once():
    monitor = Monitor(heartbeat_interval_s=1.0, lost_after_heartbeats=3)
    register(monitor, "w1", now=0.0)
    register(monitor, "w2", now=0.0)
    for t in (1.0, 2.0, 3.0):
        monitor.handle(ev.Heartbeat(sender="w2", worker_id="w2", seq=int(t)), t)
        assert monitor.handle(Tick(t), t) == [], f"nobody is lost at t={t}"
    actions = monitor.handle(Tick(3.05), 3.05)
    lost = [a.event for a in actions if isinstance(a, Tell)]
    assert [(a.actor) for a in actions if isinstance(a, Tell)] == ["coordinator", "allocator", "refactor_executor"]
    assert all(isinstance(e, ev.WorkerLost) and e.worker_id == "w1" for e in lost)
    assert log_names(actions) == ["worker.lost"]
    assert monitor.handle(Tick(10.0), 4.0) == [], "a loss is reported once"
    states = {w.worker_id: w.state for w in monitor.status(0, 4.0).workers}
    assert states == {"w1": "lost", "w2": "alive"}


def test_heartbeat_of_an_unknown_or_lost_worker_asks_it_to_register_again():
    monitor = Monitor(heartbeat_interval_s=1.0)
    actions = monitor.handle(ev.Heartbeat(sender="ghost", worker_id="ghost", seq=1), 0.0)
    assert len(actions) == 1 and isinstance(actions[0].event, ev.ErrorReply)
    assert actions[0].event.code == "not_registered" and actions[0].peer == "ghost"


def test_a_restarted_worker_reregisters_cleanly():
    monitor = Monitor(heartbeat_interval_s=1.0)
    register(monitor, "w1", now=0.0, pid=100)
    actions = register(monitor, "w1", now=0.5, pid=200, cmd_id=2)
    assert log_names(actions) == ["worker.reregistered", "worker.lost", "worker.registered"]
    assert [type(a.event) for a in actions if isinstance(a, Tell)] == [ev.WorkerLost] * 3 + [ev.RegisterWorker] * 3
    (worker,) = monitor.status(0, 0.6).workers
    assert (worker.pid, worker.state) == (200, "alive")


def test_status_merges_stage_metrics_and_engine_kv_into_pipelines():
    monitor = Monitor()
    register(monitor, "w1", now=0.0)
    pipeline = ev.PipelineView(
        pipeline_id="p",
        state="READY",
        epoch=0,
        model_dir="/m",
        engine_host="e",
        stages=[ev.StageView(stage=0, worker_id="w1", units=["embed", "head"])],
    )
    monitor.handle(ev.PipelineUpdated(sender="coordinator", pipeline=pipeline), 0.0)
    metrics = ev.StageMetrics(
        pipeline_id="p",
        epoch=0,
        stage=0,
        queue_length=3,
        busy_fraction=0.5,
        kv_blocks_used=0,
        kv_blocks_free=0,
        tokens_per_s=10.0,
    )
    monitor.handle(ev.WorkerMetrics(sender="w1", worker_id="w1", stages=[metrics]), 0.1)
    monitor.handle(
        ev.EngineMetrics(
            sender="e",
            host_id="e",
            pipeline_id="p",
            epoch=0,
            running=2,
            waiting=0,
            kv_blocks_used=5,
            kv_blocks_free=95,
            tokens_per_s=0.0,
        ),
        0.1,
    )
    monitor.handle(ev.MessageRejected(sender="controller", code="malformed", peer="x"), 0.1)
    (view,) = monitor.status(0, 0.2).pipelines
    assert (view.stages[0].queue_length, view.stages[0].busy_fraction) == (3, 0.5)
    assert (view.stages[0].kv_blocks_used, view.stages[0].kv_blocks_free) == (5, 95)
    assert monitor.status(0, 0.2).rejected_messages == 1
    monitor.handle(ev.PipelineUpdated(sender="coordinator", pipeline=pipeline, removed=True), 0.3)
    assert monitor.status(0, 0.3).pipelines == []
