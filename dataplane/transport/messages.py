"""Data-plane headers: what travels with each micro-batch and back to the engine.

Headers are msgspec Structs encoded as MessagePack; activations travel beside them
as tensors through the transport, never inside a header.
"""

from __future__ import annotations

import msgspec


class SamplingOptions(msgspec.Struct, array_like=True, frozen=True):
    """One request's sampling rules as the last stage applies them; ``logprobs`` None: none
    returned, k >= 0: the sampled token's and the top k alternatives'."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None


class SeqWork(msgspec.Struct, array_like=True):
    """One sequence's share of a micro-batch: new tokens from position ``start`` on."""

    seq_id: int
    token_ids: list[int]
    start: int
    block_table: list[int]
    step: int
    sampling: SamplingOptions


class MicroBatch(msgspec.Struct, tag="micro_batch"):
    batch_id: int
    epoch: int
    seqs: list[SeqWork]


class TokenLogprobs(msgspec.Struct, array_like=True):
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class SampledTokens(msgspec.Struct, tag="sampled"):
    """The last stage's answer to a micro-batch: one token per sequence (-1 for a sequence in
    ``failures``, which maps its seq id to why it could not be sampled); ``logprobs`` has an entry
    (None where not asked) per sequence when any sequence asked for them."""

    batch_id: int
    epoch: int
    seq_ids: list[int]
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    failures: dict[int, str] = {}


class StageFailure(msgspec.Struct, tag="stage_failure"):
    batch_id: int
    stage: int
    message: str


class KvBlocks(msgspec.Struct, tag="kv_blocks"):
    """KV slots of one layer moving to its next owner; tensors: slot ids (int64), then
    the slots' keys and values ``[2, n, kv_heads, head_dim]``."""

    epoch: int
    transfer_id: int
    layer: int


class UnitWeights(msgspec.Struct, tag="unit_weights"):
    """A unit's weights sent by a peer that serves it; tensors in the order of ``names``."""

    epoch: int
    unit: str
    names: list[str]


class EpochSeal(msgspec.Struct, tag="epoch_seal"):
    """Follows the engine's last launched micro-batch down the pipeline: a stage that forwards
    it has served every one of the first ``launched`` micro-batches that reach it."""

    epoch: int
    launched: int


DataMessage = MicroBatch | SampledTokens | StageFailure | KvBlocks | UnitWeights | EpochSeal


class _MicroBatchEnvelope(msgspec.Struct, tag="micro_batch"):
    batch_id: int
    epoch: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DataMessage)
_envelope_decoder = msgspec.msgpack.Decoder(_MicroBatchEnvelope)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> DataMessage:
    return _decoder.decode(data)


def micro_batch_id(data: bytes) -> int | None:
    """The batch id of a micro-batch header whose body does not decode (a bad sequence entry), so the
    stage can answer it with a failure; None when ``data`` is not a micro-batch header at all."""
    try:
        return _envelope_decoder.decode(data).batch_id
    except msgspec.DecodeError:
        return None
