"""The control-bus wire: every event round-trips, a plain msgpack peer can speak it, hostile bytes are refused."""

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from wire_samples import EVENTS, hostile

from common import events as ev
from common.wire import MAX_MESSAGE_BYTES, WireError, decode, encode


def test_the_catalogue_has_unique_tags_and_every_event_carries_version_and_sender():
    assert len(ev.CATALOGUE) == len(ev.ANY_EVENT.__args__)
    for cls in ev.CATALOGUE.values():
        names = {f.name for f in msgspec.structs.fields(cls)}
        assert {"v", "sender"} <= names, cls
        if issubclass(cls, ev.Command):
            assert "cmd_id" in names
        if issubclass(cls, ev.Reply):
            assert "reply_to" in names


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__struct_config__.tag)
def test_every_event_round_trips_and_a_plain_msgpack_peer_reads_and_writes_it(event):
    data = encode(event)
    assert decode(data) == event
    plain = msgpack.unpackb(data)
    assert plain["type"] == type(event).__struct_config__.tag
    assert plain["v"] == ev.PROTOCOL_VERSION and plain["sender"] == event.sender
    rebuilt = msgpack.packb(dict(reversed(list(plain.items()))))  # another peer, another key order
    assert decode(rebuilt) == event


def test_a_plain_msgpack_client_can_write_a_command_from_scratch():
    data = msgpack.packb({"type": "status", "v": 1, "sender": "script", "cmd_id": 42})
    assert decode(data) == ev.StatusRequest(sender="script", cmd_id=42)


@pytest.mark.parametrize(
    "payload,code,cmd_id",
    [
        (b"\xc1", "malformed", -1),
        (msgpack.packb([1, 2, 3]), "malformed", -1),
        (msgpack.packb({"type": "launch_missiles", "v": 1, "cmd_id": 3}), "unknown_type", 3),
        (msgpack.packb({"type": "status", "v": 99, "cmd_id": 4}), "bad_version", 4),
        (msgpack.packb({"type": "status", "v": 1, "cmd_id": "four"}), "invalid", -1),
        (msgpack.packb({"type": "status", "v": 1, "cmd_id": 5, "extra": 1}), "invalid", 5),
        (msgpack.packb({"type": "heartbeat", "v": 1, "worker_id": "w"}), "invalid", -1),
        (b"\x00" * (MAX_MESSAGE_BYTES + 1), "oversized", -1),
    ],
)
def test_bad_messages_are_refused_with_a_reason_and_the_command_id_when_readable(payload, code, cmd_id):
    with pytest.raises(WireError) as caught:
        decode(payload)
    assert (caught.value.code, caught.value.cmd_id) == (code, cmd_id)
    reply = caught.value.reply("controller")
    assert isinstance(reply, ev.ErrorReply) and decode(encode(reply)) == reply


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(hostile)
def test_the_decoder_refuses_or_types_every_hostile_message(data):
    try:
        event = decode(data)
    except WireError as error:
        assert error.code in {"malformed", "unknown_type", "bad_version", "invalid"}
        assert isinstance(error.cmd_id, int)
        return
    assert isinstance(event, ev.ANY_EVENT.__args__) and event.v == ev.PROTOCOL_VERSION
