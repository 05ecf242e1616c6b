"""A worker's stage survives data messages it cannot read."""

from __future__ import annotations

import torch
import zmq

from common.runtime import new_session_dir
from dataplane.transport import messages, open_outbox
from dataplane.worker.hosted_stage import HostedStage


def test_a_message_whose_ring_is_gone_is_dropped_and_the_next_one_arrives(tmp_path):
    context = zmq.Context()
    events = []
    stage = HostedStage(context, "p", 0, "shm", "w0", str(new_session_dir("hs-")), "cpu", events.append, 0)
    sender = open_outbox("shm", context, stage.inbox.address)
    try:
        header = messages.encode(messages.UnitWeights(1, "L0.mlp", ["w"]))
        sender.send(header, [torch.ones(64)])
        sender.ring.path.unlink()  # the sender gave up and removed its ring before the stage read it
        stage.inbox.socket.poll(5000)
        stage.receive()
        assert not stage.queue and not events, "dropped, and with no epoch being prepared nobody is told"
        replacement = open_outbox("shm", context, stage.inbox.address)
        replacement.send(header, [torch.full((64,), 2.0)])
        stage.inbox.socket.poll(5000)
        stage.receive()
        (message,) = stage.queue
        assert torch.equal(message.tensors[0], torch.full((64,), 2.0))
        message.release()
        replacement.close()
    finally:
        sender.close()
        stage.close()
        context.term()
