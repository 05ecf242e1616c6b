"""The cluster refactor executor and the refactor coordinator as pure state machines: a migrate
carried out command by command, a failed PREPARE aborted, refusals — no sockets."""

import numpy as np
import pytest
from test_deploy_coordinator import run_to_ready

from common import events as ev
from controlplane.actor import Send, Tell
from controlplane.allocator import Allocator
from controlplane.deploy.coordinator import DeployCoordinator
from controlplane.deploy.plan import plan_pipeline
from controlplane.monitor import Monitor
from controlplane.refactor.coordinator import RefactorCoordinator
from controlplane.refactor.executor import RefactorExecutor
from controlplane.refactor.planner import RefactorPlanner


class Harness:
    """A READY 2-stage pipeline p1 on w0, w1 (w2 idle), the executor and the refactor coordinator wired
    as the controller wires them; ``step`` feeds an event and routes the actors' Tells between them."""

    def __init__(self, model_dir: str, memory: dict[str, int] | None = None) -> None:
        self.coordinator = DeployCoordinator(plan_pipeline, phase_timeout_s=30.0)
        self.coordinator.handle(
            ev.RegisterEngineHost(sender="e0", cmd_id=1, host_id="e0", host="h", pid=1, request_address="ipc://r"), 0.0
        )
        run_to_ready(self.coordinator, model_dir, workers=("w0", "w1"))
        self.monitor = Monitor()
        for worker in ("w0", "w1", "w2"):
            self.register(worker, (memory or {}).get(worker, 1 << 40))
        self.executor = RefactorExecutor(RefactorPlanner(self.coordinator, self.monitor))
        self.machine = RefactorCoordinator(self.executor.plan)
        self.allocator = Allocator()
        self.allocator.reservations["p1"] = {"w0": 1, "w1": 1}
        self.actors = {
            "refactor": self.machine,
            "refactor_executor": self.executor,
            "coordinator": self.coordinator,
            "allocator": self.allocator,
        }
        self.sent: list[Send] = []

    def register(self, worker: str, memory: int = 1 << 40, pid: int = 1) -> None:
        device = ev.DeviceInfo(
            device_id=worker, kind="cpu", name="virtual", memory_total=memory, memory_free=memory, host="h"
        )
        self.monitor.handle(
            ev.RegisterWorker(sender=worker, cmd_id=pid, worker_id=worker, host="h", pid=pid, device=device), 0.0
        )

    def step(self, event, now: float = 10.0) -> list[Send]:
        """Hand ``event`` to whoever accepts it; returns the Sends to peers it led to."""
        queue = [(actor, event) for actor in self.actors.values() if isinstance(event, actor.accepts)]
        out = []
        while queue:
            actor, item = queue.pop(0)
            for action in actor.handle(item, now):
                if isinstance(action, Tell) and action.actor in self.actors:
                    queue.append((self.actors[action.actor], action.event))
                elif isinstance(action, Send):
                    out.append(action)
        self.sent += out
        return out


def of(sends, kind):
    return [s for s in sends if isinstance(s.event, kind)]


def migrate_request(**kw):
    return ev.RefactorPipeline(sender="op", cmd_id=1, pipeline_id="p1", migrate=[1], **kw)


def test_a_migrate_runs_every_command_in_order_and_reshapes_the_pipeline(tiny_model):
    h = Harness(str(tiny_model))
    layout = [f"{u[0]}..{u[-1]}" for u in h.coordinator.pipelines["p1"].plan.stage_units]
    sends = h.step(migrate_request(layout=layout))
    opens = of(sends, ev.OpenStageInbox)
    assert sorted(s.peer for s in opens) == ["w0", "w2"]
    held = h.allocator.holds["p1"]
    assert "w2" in held and "w1" not in held, "the new worker is held for the refactor from PREPARE on"
    sends = []
    for s in opens:
        sends += h.step(
            ev.StageInboxOpened(
                sender=s.peer, reply_to=s.event.cmd_id, pipeline_id="p1", epoch=1, inbox_address=f"ipc://{s.peer}-new"
            )
        )
    prepares, units = of(sends, ev.PrepareStageEpoch), of(sends, ev.SendStageUnits)
    assert {s.peer: s.event.stage for s in prepares} == {"w0": 0, "w2": 1}
    assert prepares[0].event.next_address == "ipc://w2-new" and set(prepares[1].event.sources.values()) == {"peer"}
    assert [(s.peer, s.event.dest_address) for s in units] == [("w1", "ipc://w2-new")]
    sends = h.step(ev.Ack(sender="w1", reply_to=units[0].event.cmd_id))
    for s in prepares:
        sends += h.step(
            ev.StageEpochPrepared(
                sender=s.peer,
                reply_to=s.event.cmd_id,
                pipeline_id="p1",
                epoch=1,
                stage=s.event.stage,
                sources=s.event.sources,
                bytes_by_source={"peer": 100},
                kv_bytes_allocated=0,
                seconds=0.1,
            )
        )
    (snapshot,) = of(sends, ev.SnapshotKv)
    sends = h.step(
        ev.KvSnapshot(
            sender="e0",
            reply_to=snapshot.event.cmd_id,
            pipeline_id="p1",
            epoch=0,
            seq_ids=[7],
            block_tables=[[3, 4]],
            num_computed=[20],
        )
    )
    copies = of(sends, ev.CopyStageKv)
    assert copies and all(s.peer == "w1" and s.event.dest_address == "ipc://w2-new" for s in copies)
    assert np.frombuffer(copies[0].event.slots, "<i8").tolist() == [3 * 16 + i for i in range(16)] + [
        64 + i for i in range(4)
    ]
    for s in copies:
        assert not of(h.step(ev.Ack(sender="w1", reply_to=s.event.cmd_id)), ev.PauseEngine)
    sends = []
    for s in copies:
        sends += h.step(
            ev.StageKvCopied(
                sender="w2",
                pipeline_id="p1",
                epoch=1,
                worker_id="w2",
                transfer_id=s.event.transfer_id,
                num_slots=20,
                nbytes=2000,
            )
        )
    (again,) = of(sends, ev.SnapshotKv)
    assert not of(sends, ev.PauseEngine), "a second pre-copy round looks at what was written meanwhile"
    sends = h.step(
        ev.KvSnapshot(
            sender="e0",
            reply_to=again.event.cmd_id,
            pipeline_id="p1",
            epoch=0,
            seq_ids=[7],
            block_tables=[[3, 4]],
            num_computed=[21],
        )
    )
    assert not of(sends, ev.CopyStageKv), "one new slot is left to SWITCH"
    (pause,) = of(sends, ev.PauseEngine)
    assert pause.event.seal, "SWITCH seals the old epoch so the delta can follow the drain"
    sends = h.step(
        ev.EnginePaused(
            sender="e0",
            reply_to=pause.event.cmd_id,
            pipeline_id="p1",
            epoch=0,
            seq_ids=[7],
            block_tables=[[3, 4]],
            num_computed=[22],
            launched=41,
        )
    )
    deltas, activates = of(sends, ev.CopyStageKv), of(sends, ev.ActivateStageEpoch)
    assert all(np.frombuffer(s.event.slots, "<i8").tolist() == [68, 69] for s in deltas)
    assert {s.event.after_seal for s in deltas + activates} == {41}, "delta and activation wait for the seal"
    assert all(s.event.after_seal == -1 for s in copies), "pre-copy does not wait for a seal"
    expect = {s.peer: [t.transfer_id for t in s.event.expect] for s in activates}
    assert sorted(expect["w2"]) == sorted(s.event.transfer_id for s in deltas) and expect["w0"] == []
    for s in deltas:
        h.step(ev.Ack(sender="w1", reply_to=s.event.cmd_id))
    sends = []
    for s in activates:
        sends += h.step(ev.StageEpochActivated(sender=s.peer, reply_to=s.event.cmd_id, pipeline_id="p1", epoch=1))
    (resume,) = of(sends, ev.ResumeEngine)
    assert resume.event.first_stage_address == "ipc://w0-new" and resume.event.epoch == 1
    sends = h.step(
        ev.EngineResumed(
            sender="e0",
            reply_to=resume.event.cmd_id,
            pipeline_id="p1",
            epoch=1,
            switch=ev.SwitchTiming(stall_s=0.001, switch_s=0.003, requests_carried=1),
        )
    )
    pipeline = h.coordinator.pipelines["p1"]
    assert pipeline.workers == ["w0", "w2"] and pipeline.epoch == 1 and pipeline.former_workers == {"w1"}
    assert set(h.allocator.reservations["p1"]) == {"w0", "w2"} and min(h.allocator.reservations["p1"].values()) > 1
    assert "p1" not in h.allocator.holds
    (refill,) = of(sends, ev.AwaitRefill)
    assert refill.peer == "e0" and not of(sends, ev.CommitStageEpoch), "old stages retire once the new ones refilled"
    commits = of(h.step(ev.Ack(sender="e0", reply_to=refill.event.cmd_id)), ev.CommitStageEpoch)
    assert sorted(s.peer for s in commits) == ["w0", "w1", "w2"]
    sends = []
    for s in commits:
        sends += h.step(
            ev.StageEpochSettled(
                sender=s.peer,
                reply_to=s.event.cmd_id,
                pipeline_id="p1",
                epoch=1,
                outcome="committed",
                cached_units=["L1.mlp"] if s.peer == "w1" else [],
            )
        )
    (outcome,) = [s.event for s in sends if isinstance(s.event, ev.RefactorOutcome) and s.peer != "e0"]
    assert [s.peer for s in sends if isinstance(s.event, ev.RefactorOutcome) and s.peer == "e0"] == ["e0"], (
        "the engine host hears the outcome too"
    )
    assert outcome.outcome == "committed" and outcome.epoch == 1 and outcome.kind == "migrate"
    assert outcome.weight_bytes == 200 and outcome.weight_bytes_by_source == {"peer": 200}
    assert outcome.kv_bytes == outcome.kv_bytes_precopy + outcome.kv_bytes_delta
    assert outcome.precopy_rounds == 1 and outcome.workers == ["w0", "w2"]
    assert (outcome.stall_s, outcome.switch_s, outcome.requests_carried) == (0.001, 0.003, 1)
    assert h.executor.cached_units == {"w1": {"L1.mlp"}}
    assert not h.executor.runs and not h.machine.busy("p1")


def test_an_error_in_prepare_aborts_and_every_worker_drops_the_epoch(tiny_model):
    h = Harness(str(tiny_model))
    sends = h.step(ev.RefactorPipeline(sender="op", cmd_id=1, pipeline_id="p1", num_stages=3))
    (first, *_) = of(sends, ev.OpenStageInbox)
    assert "p1" in h.allocator.holds
    sends = h.step(
        ev.ErrorReply(sender=first.peer, reply_to=first.event.cmd_id, code="command_failed", message="disk full")
    )
    aborts = of(sends, ev.AbortStageEpoch)
    assert sorted(s.peer for s in aborts) == ["w0", "w1", "w2"]
    assert not of(sends, ev.ResumeEngine), "the engine was never paused"
    sends = []
    for s in aborts:
        sends += h.step(
            ev.StageEpochSettled(sender=s.peer, reply_to=s.event.cmd_id, pipeline_id="p1", epoch=1, outcome="aborted")
        )
    (outcome,) = [s.event for s in sends if isinstance(s.event, ev.RefactorOutcome) and s.peer != "e0"]
    assert outcome.outcome == "aborted" and "disk full" in outcome.reason and outcome.epoch == 0
    assert h.coordinator.pipelines["p1"].workers == ["w0", "w1"] and h.coordinator.pipelines["p1"].epoch == 0
    assert "p1" not in h.allocator.holds, "an aborted refactor holds nothing"


def test_abort_does_not_wait_for_a_worker_lost_meanwhile(tiny_model):
    h = Harness(str(tiny_model))
    sends = h.step(ev.RefactorPipeline(sender="op", cmd_id=1, pipeline_id="p1", num_stages=3))
    (first, *_) = of(sends, ev.OpenStageInbox)
    aborts = of(
        h.step(ev.ErrorReply(sender=first.peer, reply_to=first.event.cmd_id, code="x", message="boom")),
        ev.AbortStageEpoch,
    )
    sends = []
    for s in aborts[:-1]:
        sends += h.step(
            ev.StageEpochSettled(sender=s.peer, reply_to=s.event.cmd_id, pipeline_id="p1", epoch=1, outcome="aborted")
        )
    assert not of(sends, ev.RefactorOutcome), "one worker has not answered yet"
    sends = h.step(
        ev.WorkerLost(sender="monitor", worker_id=aborts[-1].peer, silent_for_s=0.0, reason="exited with code 1"), 11.0
    )
    (outcome,) = [s.event for s in of(sends, ev.RefactorOutcome) if s.peer == "op"]
    assert outcome.outcome == "aborted" and "boom" in outcome.reason and outcome.phase_seconds["ABORT"] == 1.0


@pytest.mark.parametrize(
    "request_fields, reason",
    [
        (dict(num_stages=4), "more worker"),
        (dict(pipeline_id="nope", num_stages=2), "no pipeline"),
        (dict(num_stages=0), "stage count"),
    ],
)
def test_refusals_move_nothing(tiny_model, request_fields, reason):
    h = Harness(str(tiny_model))
    fields = dict(sender="op", cmd_id=1, pipeline_id="p1") | request_fields
    sends = h.step(ev.RefactorPipeline(**fields))
    (outcome,) = [s.event for s in sends if isinstance(s.event, ev.RefactorOutcome) and s.peer != "e0"]
    assert outcome.outcome == "refused" and reason in outcome.reason
    assert len(sends) == 1 and not h.executor.runs


def test_a_stage_that_does_not_fit_its_workers_free_memory_is_refused(tiny_model):
    h = Harness(str(tiny_model), memory={"w2": 1000})
    sends = h.step(ev.RefactorPipeline(sender="op", cmd_id=1, pipeline_id="p1", num_stages=3))
    (outcome,) = [s.event for s in sends if isinstance(s.event, ev.RefactorOutcome) and s.peer != "e0"]
    assert outcome.outcome == "refused" and "on w2, which has 1000 free" in outcome.reason
    assert len(sends) == 1


def test_pre_copy_repeats_while_requests_write_much_and_stops_after_three_rounds(tiny_model):
    h = Harness(str(tiny_model))
    layout = [f"{u[0]}..{u[-1]}" for u in h.coordinator.pipelines["p1"].plan.stage_units]
    sends = h.step(migrate_request(layout=layout))
    opens = of(sends, ev.OpenStageInbox)
    sends = []
    for s in opens:
        sends += h.step(
            ev.StageInboxOpened(
                sender=s.peer, reply_to=s.event.cmd_id, pipeline_id="p1", epoch=1, inbox_address=f"ipc://{s.peer}-new"
            )
        )
    for s in of(sends, ev.SendStageUnits):
        sends += h.step(ev.Ack(sender=s.peer, reply_to=s.event.cmd_id))
    for s in of(sends, ev.PrepareStageEpoch):
        sends += h.step(
            ev.StageEpochPrepared(
                sender=s.peer,
                reply_to=s.event.cmd_id,
                pipeline_id="p1",
                epoch=1,
                stage=s.event.stage,
                sources=s.event.sources,
                bytes_by_source={},
                kv_bytes_allocated=0,
                seconds=0.1,
            )
        )
    table = list(range(20))
    copied_per_round = []
    for written in (100, 200, 300):  # each round, the requests wrote 100 more positions
        (snapshot,) = of(sends, ev.SnapshotKv)
        sends = h.step(
            ev.KvSnapshot(
                sender="e0",
                reply_to=snapshot.event.cmd_id,
                pipeline_id="p1",
                epoch=0,
                seq_ids=[7],
                block_tables=[table],
                num_computed=[written],
            )
        )
        copies = of(sends, ev.CopyStageKv)
        copied_per_round.append(len(np.frombuffer(copies[0].event.slots, "<i8")))
        for s in copies:
            h.step(ev.Ack(sender="w1", reply_to=s.event.cmd_id))
        sends = []
        for s in copies:
            sends += h.step(
                ev.StageKvCopied(
                    sender="w2",
                    pipeline_id="p1",
                    epoch=1,
                    worker_id="w2",
                    transfer_id=s.event.transfer_id,
                    num_slots=copied_per_round[-1],
                    nbytes=10,
                )
            )
    assert copied_per_round == [100, 100, 100]
    assert not of(sends, ev.SnapshotKv) and of(sends, ev.PauseEngine), "after three rounds SWITCH takes the rest"
