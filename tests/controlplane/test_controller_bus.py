"""A real controller process on its sockets: hostile traffic, command-id discipline, CURVE on TCP."""

import json
import os
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
from bus_support import REPO, ControllerProcess, free_port
from hypothesis import HealthCheck, given, settings
from wire_samples import hostile

from common import events as ev
from common.wire import MAX_MESSAGE_BYTES, decode, encode
from controlplane.client import BusClient


@pytest.fixture
def controller(tmp_path):
    process = ControllerProcess(tmp_path)
    yield process
    process.stop()


def test_bad_messages_get_error_replies_and_are_counted(controller):
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(controller.ipc)
    cases = [
        (b"\xc1", "malformed"),
        (msgpack.packb({"type": "nope", "v": 1, "sender": "t", "cmd_id": 1}), "unknown_type"),
        (msgpack.packb({"type": "status", "v": 7, "sender": "t", "cmd_id": 2}), "bad_version"),
        (encode(ev.StatusRequest(sender="t", cmd_id=10)), None),
        (encode(ev.StatusRequest(sender="t", cmd_id=10)), "duplicate_command"),
        (encode(ev.StatusRequest(sender="t", cmd_id=9)), "out_of_order_command"),
        (b"\x00" * (MAX_MESSAGE_BYTES + 1), "oversized"),
    ]
    answers = []
    for payload, _ in cases:
        dealer.send(payload)
        assert dealer.poll(5000), f"no answer to {payload[:20]!r}"
        reply = decode(dealer.recv())
        answers.append(reply.code if isinstance(reply, ev.ErrorReply) else None)
    assert answers == [expected for _, expected in cases]
    dealer.send_multipart([b"two", b"frames"])
    assert dealer.poll(5000) and decode(dealer.recv()).code == "malformed"
    dealer.close()
    with BusClient(controller.ipc) as bus:
        assert bus.request(ev.StatusRequest).rejected_messages == 7
    rejected = [line for line in controller.log_lines() if line.get("event") == "bus.message_rejected"]
    assert {line["code"] for line in rejected} == {
        "malformed",
        "unknown_type",
        "bad_version",
        "duplicate_command",
        "out_of_order_command",
        "oversized",
    }


def test_ten_thousand_hostile_messages_then_status_still_answers(controller):
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    dealer.setsockopt(zmq.SNDTIMEO, 10_000)
    dealer.connect(controller.ipc)
    sent = []

    @settings(
        max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
    )
    @given(hostile)
    def send(payload):
        dealer.send(payload)
        sent.append(len(payload))

    send()
    dealer.close()
    assert len(sent) >= 10_000
    with BusClient(controller.ipc, timeout_s=30) as bus:
        status = bus.request(ev.StatusRequest)
    assert status.rejected_messages >= len(sent) * 0.9, "hostile messages are refused and counted"
    assert controller.process.poll() is None


def test_curve_tcp_answers_authorised_peers_only(tmp_path):
    from controlplane import security

    key_dir = tmp_path / "keys"
    security.init_keys(key_dir)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    process = ControllerProcess(
        tmp_path, {"FLEXPIPE_CONTROLLER_TCP": endpoint, "FLEXPIPE_SECURITY_KEY_DIR": str(key_dir)}
    )
    try:
        with BusClient(endpoint, key_dir=key_dir, timeout_s=10) as bus:
            assert isinstance(bus.request(ev.StatusRequest), ev.StatusReply)
        public, secret = zmq.curve_keypair()
        server_public = security.load_keys(key_dir)
        stranger = zmq.Context.instance().socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.curve_publickey, stranger.curve_secretkey = public, secret
        security.secure_client_socket(stranger, server_public)
        stranger.curve_publickey, stranger.curve_secretkey = public, secret  # an unknown key pair, the right server key
        plain = zmq.Context.instance().socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        for intruder in (stranger, plain):
            intruder.connect(endpoint)
            intruder.send(encode(ev.StatusRequest(sender="intruder", cmd_id=1)))
        assert not stranger.poll(1500) and not plain.poll(100), "an unauthenticated peer got an answer"
        stranger.close()
        plain.close()
        deadline = time.monotonic() + 10
        while not any(
            line.get("event") == "bus.peer_denied" and line.get("address") == "127.0.0.1"
            for line in process.log_lines()
        ):
            assert time.monotonic() < deadline, f"denied peers were not logged: {process.log_lines()[-5:]}"
            time.sleep(0.1)
        with BusClient(endpoint, key_dir=key_dir, timeout_s=10) as bus:
            assert isinstance(bus.request(ev.StatusRequest), ev.StatusReply), "authorised peers still get answers"
        fpctl = subprocess.run(
            [sys.executable, "-m", "controlplane.cli.fpctl", "--endpoint", endpoint, "status", "--json"],
            env=dict(os.environ, FLEXPIPE_SECURITY_KEY_DIR=str(key_dir), PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert fpctl.returncode == 0, fpctl.stderr
        assert json.loads(fpctl.stdout)["workers"] == []
    finally:
        process.stop()


def test_plain_tcp_needs_the_insecure_flag_and_loopback(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    process = ControllerProcess(tmp_path, {"FLEXPIPE_CONTROLLER_TCP": endpoint}, ["--insecure"])
    try:
        with BusClient(endpoint, insecure=True) as bus:
            assert isinstance(bus.request(ev.StatusRequest), ev.StatusReply)
        assert any(line.get("event") == "bus.insecure" for line in process.log_lines())
    finally:
        process.stop()
