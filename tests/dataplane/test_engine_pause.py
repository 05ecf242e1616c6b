"""The engine loop's sealed pause, over real sockets, with a thread answering as a one-stage pipeline."""

from __future__ import annotations

import threading
import time

import pytest

from common.errors import PipelineError
from dataplane.engine.core import EngineCore
from dataplane.engine.kv_blocks import BlockAllocator
from dataplane.engine.sampling_params import SamplingParams
from dataplane.engine.scheduler import Scheduler
from dataplane.engine.sequence import Sequence
from dataplane.transport import Inbox, inbox_address, messages, open_outbox
from dataplane.transport.messages import SamplingOptions

RECV_MS = 50


class ThreadStage:
    """Answers every micro-batch with token 7 per sequence after ``delay_s``; records what it saw, in order."""

    def __init__(self, context, session_dir: str, engine_address: str, delay_s: float) -> None:
        self.inbox = Inbox(context, inbox_address("tcp", session_dir, "stage"))
        self.to_engine = open_outbox("tcp", context, engine_address)
        self.delay_s = delay_s
        self.seen: list = []
        self.hold = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            message = self.inbox.recv(RECV_MS)
            if message is None:
                continue
            header = messages.decode(message.header)
            self.seen.append(header)
            if isinstance(header, messages.MicroBatch):
                while self.hold.is_set() and not self.stop.is_set():
                    time.sleep(0.005)
                time.sleep(self.delay_s)
                reply = messages.SampledTokens(
                    header.batch_id, header.epoch, [s.seq_id for s in header.seqs], [7] * len(header.seqs)
                )
                self.to_engine.send(messages.encode(reply))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.inbox.close()
        self.to_engine.close()


@pytest.fixture
def engine_and_stage(context, session_dir):
    engine_inbox = Inbox(context, inbox_address("tcp", session_dir, "engine"))
    stage = ThreadStage(context, session_dir, engine_inbox.address, delay_s=0.002)
    to_stage = open_outbox("tcp", context, stage.inbox.address)
    scheduler = Scheduler(BlockAllocator(256, 4), num_stages=2, max_num_seqs=16, max_num_batched_tokens=4096)
    engine = EngineCore(scheduler, to_stage, engine_inbox, lambda: None, epoch=3)
    stage.thread.start()
    engine.start()
    try:
        yield engine, stage
    finally:
        engine.stop()
        stage.close()
        to_stage.close()
        engine_inbox.close()


def submit(engine: EngineCore, count: int, max_tokens: int) -> list[threading.Event]:
    done = [threading.Event() for _ in range(count)]
    seqs = [
        Sequence(
            i,
            list(range(3, 3 + 5 + i)),
            SamplingParams(max_tokens=max_tokens, temperature=0.0),
            SamplingOptions(),
            frozenset(),
            1024,
            on_finish=lambda s, e=done[i]: e.set(),
        )
        for i in range(count)
    ]
    engine.submit(seqs)
    return done


def test_a_sealed_pause_seals_behind_the_last_launch_and_launches_nothing_until_resumed(engine_and_stage):
    engine, stage = engine_and_stage
    done = submit(engine, 6, max_tokens=400)
    deadline = time.monotonic() + 10
    while engine.launched < 6 and time.monotonic() < deadline:
        time.sleep(0.005)
    stage.hold.set()  # the micro-batches now in flight stay there while the pause begins
    launched, kv = engine.begin_pause(
        5.0,
        seal=True,
        on_paused=lambda: engine.scheduler.kv_in_use(in_flight=True),
        on_parked=lambda: len(engine.scheduler.running),
    )
    in_flight = [s for s in engine.scheduler.running if s.in_flight]
    assert in_flight, "the pause began with micro-batches in flight"
    assert {seq_id: upto for seq_id, _, upto in kv} == {
        s.seq_id: s.num_computed + s.pending_tokens for s in engine.scheduler.running
    }
    stage.hold.clear()
    parked_at = engine.wait_parked(5.0)
    assert parked_at <= time.monotonic()
    assert engine.parked_result == 6 and not engine.in_flight

    seals = [i for i, h in enumerate(stage.seen) if isinstance(h, messages.EpochSeal)]
    assert len(seals) == 1
    seal = stage.seen[seals[0]]
    assert (seal.epoch, seal.launched) == (3, launched)
    before = [h.batch_id for h in stage.seen[: seals[0]]]
    assert before == list(range(launched)), "every micro-batch launched before the seal reached the stage ahead of it"
    time.sleep(0.05)
    assert len(stage.seen) == seals[0] + 1 and engine.launched == launched, "nothing launched while parked"
    assert all(
        s.num_computed == upto for s in engine.scheduler.running for seq_id, _, upto in kv if seq_id == s.seq_id
    ), "the KV written by the drained micro-batches is what the pause announced"

    engine.resume()
    deadline = time.monotonic() + 10
    while engine.launched == launched and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.launched > launched, "launching resumes"
    assert not any(isinstance(h, messages.EpochSeal) for h in stage.seen[seals[0] + 1 :])
    engine.stop()
    assert all(event.wait(5) for event in done), "every sequence ended"


def test_an_unsealed_pause_sends_no_seal_and_a_stopped_loop_fails_a_pause_at_once(engine_and_stage):
    engine, stage = engine_and_stage
    done = submit(engine, 2, max_tokens=50)
    assert engine.begin_pause(5.0, on_paused=lambda: "stopped") == (engine.launched, "stopped")
    engine.wait_parked(5.0)
    assert not any(isinstance(h, messages.EpochSeal) for h in stage.seen)
    engine.resume()
    assert all(event.wait(10) for event in done)

    engine.stop()
    started = time.monotonic()
    with pytest.raises(PipelineError, match="stopped or stuck"):
        engine.begin_pause(30.0, seal=True)
    assert time.monotonic() - started < 5, "a pause does not wait out its timeout on a loop that is gone"
    assert not engine._pause.is_set()
