"""Encoding and validating control-bus events. Decoding is validation: what passes is a typed event."""

from __future__ import annotations

import msgspec

from common.errors import FlexPipeError
from common.events import ANY_EVENT, CATALOGUE, PROTOCOL_VERSION, ErrorReply, Event

MAX_MESSAGE_BYTES = 1 << 20

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ANY_EVENT)


class WireError(FlexPipeError):
    """A message that is not a valid event. ``code`` is one of ``oversized``, ``malformed``,
    ``unknown_type``, ``bad_version``, ``invalid``; ``cmd_id`` is the command's id when readable."""

    def __init__(self, code: str, message: str, cmd_id: int = -1) -> None:
        super().__init__(message)
        self.code, self.cmd_id = code, cmd_id

    def reply(self, sender: str) -> ErrorReply:
        return ErrorReply(sender=sender, reply_to=self.cmd_id, code=self.code, message=str(self))


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes | memoryview, max_bytes: int = MAX_MESSAGE_BYTES) -> Event:
    """The event in ``data``; raises ``WireError`` saying why it is not one."""
    if len(data) > max_bytes:
        raise WireError("oversized", f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        event = _decoder.decode(data)
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: e.g. a str that is not UTF-8
        raise _diagnose(data, exc) from None
    if event.v != PROTOCOL_VERSION:
        raise WireError(
            "bad_version",
            f"protocol version {event.v} is not supported (this peer speaks {PROTOCOL_VERSION})",
            getattr(event, "cmd_id", -1),
        )
    return event


def _diagnose(data, error: Exception) -> WireError:
    try:
        raw = msgspec.msgpack.decode(data)
    except (msgspec.DecodeError, ValueError) as exc:
        return WireError("malformed", f"not MessagePack: {exc}")
    if not isinstance(raw, dict):
        return WireError("malformed", f"an event is a MessagePack map, got {type(raw).__name__}")
    cmd_id = raw.get("cmd_id") if isinstance(raw.get("cmd_id"), int) and not isinstance(raw.get("cmd_id"), bool) else -1
    if raw.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        return WireError(
            "bad_version",
            f"protocol version {raw.get('v')!r} is not supported (this peer speaks {PROTOCOL_VERSION})",
            cmd_id,
        )
    if not isinstance(raw.get("type"), str) or raw["type"] not in CATALOGUE:
        return WireError("unknown_type", f"unknown event type {raw.get('type')!r}", cmd_id)
    return WireError("invalid", f"invalid {raw['type']} event: {error}", cmd_id)
