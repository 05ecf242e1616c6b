"""A cluster pipeline re-shaped by hand, command by command, over the control bus: real worker and
engine-host processes, weights and KV moving between workers on the data plane.

The test plays the coordinator (see ``stand_in_controller``): it deploys a 2-stage pipeline of
the tiny model the way the coordinator does, then migrates stage 1 to a spare worker, or aborts
that migrate half-way, and checks that generated tokens do not change.
"""

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from stand_in_controller import ClusterProcesses, StandInController

from common import events as ev
from controlplane.client import BusClient, BusError
from controlplane.deploy.plan import plan_pipeline

PROMPT = [5, 17, 42, 9, 101, 33, 7]


def send_request(client: BusClient, max_tokens: int) -> ev.GenerateRequest:
    request = client.command(
        ev.GenerateRequest, pipeline_id="p1", prompt_token_ids=PROMPT, max_tokens=max_tokens, ignore_eos=True
    )
    client.send(request)
    return request


def tokens_until_finished(client: BusClient, cmd_id: int) -> list[int]:
    """The tokens of a request streaming on ``client`` until its last chunk."""
    tokens: list[int] = []
    while True:
        chunk = client.await_reply(cmd_id)
        tokens += chunk.token_ids
        if chunk.finish_reason:
            return tokens


class Deployed:
    """A 2-stage pipeline ``p1``: stage 0 on worker-0, stage 1 on worker-1, worker-2 spare."""

    def __init__(self, controller: StandInController, processes: ClusterProcesses, model_dir: str) -> None:
        self.controller, self.processes, self.model_dir = controller, processes, model_dir
        self.plan = plan_pipeline(
            ev.DeployPipeline(cmd_id=1, pipeline_id="p1", model_dir=model_dir, num_stages=2, max_num_seqs=8)
        )
        engine = controller.request(
            "engine-0",
            ev.PrepareEngine,
            pipeline_id="p1",
            epoch=0,
            model_dir=model_dir,
            num_stages=2,
            num_kv_blocks=self.plan.num_kv_blocks,
            block_size=16,
            max_num_seqs=8,
            transport="shm",
            max_model_len=self.plan.max_model_len,
            max_num_batched_tokens=self.plan.max_num_batched_tokens,
        )
        self.engine_inbox = engine.inbox_address
        self.inboxes = []
        for stage, worker in enumerate(["worker-0", "worker-1"]):
            loaded = controller.request(
                worker,
                ev.LoadStage,
                pipeline_id="p1",
                epoch=0,
                stage=stage,
                num_stages=2,
                model_dir=model_dir,
                units=self.plan.stage_units[stage],
                num_kv_blocks=self.plan.num_kv_blocks,
                block_size=16,
                dtype="float32",
                transport="shm",
            )
            self.inboxes.append(loaded.inbox_address)
        for stage, worker in enumerate(["worker-0", "worker-1"]):
            controller.request(
                worker,
                ev.ConnectStage,
                pipeline_id="p1",
                epoch=0,
                next_address=self.inboxes[1] if stage == 0 else "",
                engine_address=self.engine_inbox,
                slot_bytes=self.plan.slot_bytes,
            )
        controller.request("engine-0", ev.StartEngine, pipeline_id="p1", epoch=0, first_stage_address=self.inboxes[0])

    def generate(self, max_tokens: int = 24) -> list[int]:
        with BusClient(self.processes.request_endpoint, timeout_s=60) as client:
            request = send_request(client, max_tokens)
            return tokens_until_finished(client, request.cmd_id)

    @contextlib.contextmanager
    def request_stuck_at_stage_1(self, max_tokens: int = 24):
        """A request mid-generation (its first tokens out) whose next micro-batch cannot finish:
        worker-1 is stopped for the block. Yields the bus client, the request and the tokens so
        far; after the block worker-1 runs again and the request's other tokens join that list."""
        stuck = self.processes.processes["worker-1"]
        with BusClient(self.processes.request_endpoint, timeout_s=60) as client:
            request = send_request(client, max_tokens)
            tokens = list(client.await_reply(request.cmd_id).token_ids)
            stuck.send_signal(signal.SIGSTOP)
            time.sleep(0.3)  # a micro-batch already past stage 1 is answered, and the next one sticks there
            try:
                yield client, request, tokens
            finally:
                stuck.send_signal(signal.SIGCONT)
            tokens += tokens_until_finished(client, request.cmd_id)

    def prepare_migrate_of_stage_1(self, epoch: int) -> str:
        """PREPARE stage 1 on worker-2 (weights from worker-1) and stage 0 on worker-0 pointing at it;
        returns worker-2's inbox."""
        c, plan = self.controller, self.plan
        moved = plan.stage_units[1]
        inbox = c.request("worker-2", ev.OpenStageInbox, pipeline_id="p1", epoch=epoch, transport="shm").inbox_address
        prepare = c.send(
            "worker-2", ev.PrepareStageEpoch, **self._stage_fields(epoch, 1, {u: "peer" for u in moved}, "")
        )
        c.request("worker-1", ev.SendStageUnits, pipeline_id="p1", epoch=epoch, units=moved, dest_address=inbox)
        prepared = c.await_reply(prepare)
        assert (prepared.epoch, prepared.stage) == (epoch, 1)
        assert set(prepared.sources.values()) == {"peer"} and prepared.bytes_by_source["peer"] > 0
        kept = {u: "resident" for u in plan.stage_units[0]}
        prepared = c.request("worker-0", ev.PrepareStageEpoch, **self._stage_fields(epoch, 0, kept, inbox))
        assert set(prepared.sources.values()) == {"resident"}
        return inbox

    def _stage_fields(self, epoch: int, stage: int, sources: dict, next_address: str) -> dict:
        return dict(
            pipeline_id="p1",
            epoch=epoch,
            stage=stage,
            num_stages=2,
            model_dir=self.model_dir,
            units=self.plan.stage_units[stage],
            sources=sources,
            num_kv_blocks=self.plan.num_kv_blocks,
            block_size=16,
            dtype="float32",
            next_address=next_address,
            engine_address=self.engine_inbox,
            slot_bytes=self.plan.slot_bytes,
        )


@pytest.fixture
def cluster(tmp_path, tiny_model):
    runtime = Path(f"/tmp/fpr-{os.getpid()}-{tmp_path.name[-10:]}")
    runtime.mkdir(mode=0o700)
    controller = StandInController(runtime)
    processes = ClusterProcesses(runtime, tmp_path, controller, num_workers=3)
    try:
        controller.wait_registered(["worker-0", "worker-1", "worker-2", "engine-0"])
        yield Deployed(controller, processes, str(tiny_model))
    finally:
        processes.stop()
        controller.close()
        shutil.rmtree(runtime)


def test_migrating_stage_1_by_hand_keeps_the_tokens_and_retires_the_old_owner(cluster):
    c = cluster.controller
    before = cluster.generate()
    inbox = cluster.prepare_migrate_of_stage_1(epoch=1)

    paused = c.request("engine-0", ev.PauseEngine, pipeline_id="p1", timeout_s=10.0)
    assert (paused.epoch, paused.seq_ids) == (0, []), "nothing runs, so no KV has to move"
    layers = [int(u[1:].split(".")[0]) for u in cluster.plan.stage_units[1] if u.endswith(".attn")]
    slots = np.arange(32, dtype="<i8").tobytes()
    expect = [ev.KvTransfer(transfer_id=t, num_slots=32) for t in range(1, len(layers) + 1)]
    activate = c.send("worker-2", ev.ActivateStageEpoch, pipeline_id="p1", epoch=1, expect=expect)
    for transfer, layer in enumerate(layers, start=1):
        c.request(
            "worker-1",
            ev.CopyStageKv,
            pipeline_id="p1",
            epoch=1,
            transfer_id=transfer,
            layer=layer,
            dest_address=inbox,
            slots=slots,
        )
    activated = c.await_reply(activate)
    copied = [e for e in c.events if isinstance(e, ev.StageKvCopied)]
    assert sum(e.num_slots for e in copied) == 32 * len(layers) and {e.worker_id for e in copied} == {"worker-2"}
    assert all(c.events.index(e) < c.events.index(activated) for e in copied), "activated only once the KV landed"
    c.request("worker-0", ev.ActivateStageEpoch, pipeline_id="p1", epoch=1)
    c.request(
        "engine-0", ev.ResumeEngine, pipeline_id="p1", epoch=1, first_stage_address=cluster.inboxes[0], num_stages=2
    )
    settled = {
        w: c.request(w, ev.CommitStageEpoch, pipeline_id="p1", epoch=1) for w in ("worker-0", "worker-1", "worker-2")
    }
    assert {s.outcome for s in settled.values()} == {"committed"}
    assert sorted(settled["worker-1"].cached_units) == sorted(cluster.plan.stage_units[1])
    assert settled["worker-0"].cached_units == [] and settled["worker-2"].cached_units == []

    old_owner = cluster.processes.processes["worker-1"]
    old_owner.send_signal(signal.SIGKILL)
    old_owner.wait(10)
    assert cluster.generate() == before, "stage 1 serves from worker-2 now, with the same tokens"

    stale = c.refusal(
        "worker-0",
        ev.PrepareStageEpoch,
        **cluster._stage_fields(1, 0, {u: "resident" for u in cluster.plan.stage_units[0]}, inbox),
    )
    assert "epoch 1" in stale and "stale" in stale
    assert "stale" in c.refusal("worker-2", ev.AbortStageEpoch, pipeline_id="p1", epoch=1)
    assert "not paused" in c.refusal(
        "engine-0", ev.ResumeEngine, pipeline_id="p1", epoch=2, first_stage_address=inbox, num_stages=2
    )


def test_an_abort_after_activation_leaves_the_old_stages_serving(cluster):
    c = cluster.controller
    before = cluster.generate()
    cluster.prepare_migrate_of_stage_1(epoch=1)
    c.request("engine-0", ev.PauseEngine, pipeline_id="p1", timeout_s=10.0)
    for worker in ("worker-2", "worker-0"):
        c.request(worker, ev.ActivateStageEpoch, pipeline_id="p1", epoch=1)
    settled = [
        c.request(w, ev.AbortStageEpoch, pipeline_id="p1", epoch=1) for w in ("worker-0", "worker-1", "worker-2")
    ]
    assert {s.outcome for s in settled} == {"aborted"}
    c.request("engine-0", ev.ResumeEngine, pipeline_id="p1", epoch=1)
    assert cluster.generate() == before

    refused = c.refusal("worker-0", ev.ActivateStageEpoch, pipeline_id="p1", epoch=1)
    assert "no stage prepared for epoch 1" in refused
    c.request("engine-0", ev.PauseEngine, pipeline_id="p1", timeout_s=5.0)
    assert "stale" in c.refusal(
        "engine-0", ev.ResumeEngine, pipeline_id="p1", epoch=0, first_stage_address=cluster.inboxes[0], num_stages=2
    )
    c.request("engine-0", ev.ResumeEngine, pipeline_id="p1", epoch=0)
    assert cluster.generate(max_tokens=4) == before[:4]


def test_a_pause_that_cannot_drain_in_time_is_refused_and_serving_goes_on(cluster):
    c = cluster.controller
    before = cluster.generate()
    with cluster.request_stuck_at_stage_1():
        started = time.monotonic()
        refused = c.refusal("engine-0", ev.PauseEngine, pipeline_id="p1", timeout_s=0.5)
        assert time.monotonic() - started < 10
        assert "could not pause" in refused and "did not drain within 0.5s" in refused
    assert len(before) == 24 and cluster.generate() == before


def test_a_sealed_pause_answers_while_a_micro_batch_is_still_in_flight(cluster):
    c = cluster.controller
    before = cluster.generate()
    with cluster.request_stuck_at_stage_1() as (client, request, tokens):
        started = time.monotonic()
        paused = c.request("engine-0", ev.PauseEngine, pipeline_id="p1", timeout_s=5.0, seal=True)
        assert time.monotonic() - started < 3, "a sealed pause does not wait for the drain"
        while True:  # the tokens that made it out before the stop
            try:
                tokens += client.await_reply(request.cmd_id, timeout_s=0.5).token_ids
            except BusError:
                break
        assert paused.launched >= 1 and len(paused.seq_ids) == 1
        assert paused.num_computed == [len(PROMPT) + len(tokens)], (
            "the snapshot counts the position the in-flight micro-batch is writing"
        )
        c.request("engine-0", ev.ResumeEngine, pipeline_id="p1", epoch=0)
    assert tokens == before, "the seal passed the stages and serving went on unchanged"


def test_migrating_stage_1_while_a_request_streams_carries_its_kv_and_keeps_every_token(cluster):
    c = cluster.controller
    before = cluster.generate(max_tokens=240)
    inbox = cluster.prepare_migrate_of_stage_1(epoch=1)
    layers = [int(u[1:].split(".")[0]) for u in cluster.plan.stage_units[1] if u.endswith(".attn")]
    with BusClient(cluster.processes.request_endpoint, timeout_s=60) as client:
        request = send_request(client, 240)
        tokens = list(client.await_reply(request.cmd_id).token_ids)

        paused = c.request("engine-0", ev.PauseEngine, pipeline_id="p1", timeout_s=10.0)
        assert len(paused.seq_ids) == 1, "the request is mid-generation"
        (table,), (computed,) = paused.block_tables, paused.num_computed
        positions = np.arange(computed, dtype=np.int64)
        slots = (np.asarray(table, dtype=np.int64)[positions // 16] * 16 + positions % 16).astype("<i8")
        expect = [ev.KvTransfer(transfer_id=t, num_slots=len(slots)) for t in range(1, len(layers) + 1)]
        activate = c.send("worker-2", ev.ActivateStageEpoch, pipeline_id="p1", epoch=1, expect=expect)
        for transfer, layer in enumerate(layers, start=1):
            c.request(
                "worker-1",
                ev.CopyStageKv,
                pipeline_id="p1",
                epoch=1,
                transfer_id=transfer,
                layer=layer,
                dest_address=inbox,
                slots=slots.tobytes(),
            )
        c.await_reply(activate)
        c.request("worker-0", ev.ActivateStageEpoch, pipeline_id="p1", epoch=1)
        c.request(
            "engine-0", ev.ResumeEngine, pipeline_id="p1", epoch=1, first_stage_address=cluster.inboxes[0], num_stages=2
        )
        for worker in ("worker-0", "worker-1", "worker-2"):
            c.request(worker, ev.CommitStageEpoch, pipeline_id="p1", epoch=1)
        tokens += tokens_until_finished(client, request.cmd_id)
    assert tokens == before, "the request went on at worker-2 with the KV it had at worker-1"


def test_a_cancelled_request_ends_with_abort_and_frees_its_kv_blocks(cluster):
    before = cluster.generate()
    with BusClient(cluster.processes.request_endpoint, timeout_s=60) as client:
        request = send_request(client, 2000)
        tokens = list(client.await_reply(request.cmd_id).token_ids)
        client.send(client.command(ev.CancelGenerate, request_id=request.cmd_id))
        while True:
            chunk = client.await_reply(request.cmd_id)
            tokens += chunk.token_ids
            if chunk.finish_reason:
                break
    assert chunk.finish_reason == "abort" and 0 < len(tokens) < 2000
    report = cluster.controller.wait_engine_metrics(lambda m: m.requests_aborted == 1)
    assert report.kv_blocks_used == 0 and report.running == 0
    assert cluster.generate() == before
