"""Data-plane headers: what travels with each micro-batch and back to the engine.

Headers are msgspec Structs encoded as MessagePack; activations travel beside them
as tensors through the transport, never inside a header.
"""

from __future__ import annotations

import msgspec


class SamplingOptions(msgspec.Struct, array_like=True, frozen=True):
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int = 0


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
    batch_id: int
    epoch: int
    seq_ids: list[int]
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None


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

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DataMessage)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> DataMessage:
    return _decoder.decode(data)
