"""Commands between a pipeline's supervisor and its stage worker processes (MessagePack)."""

from __future__ import annotations

import msgspec


class WorkerHello(msgspec.Struct, tag="worker_hello"):
    worker_id: str
    pid: int
    inbox: str


class LoadStage(msgspec.Struct, tag="load_stage"):
    """Everything a worker needs to serve stage ``stage`` of ``num_stages``."""

    stage: int
    num_stages: int
    epoch: int
    model_dir: str
    units: list[str]
    num_kv_blocks: int
    block_size: int
    dtype: str
    device: str
    transport: str
    next_address: str
    engine_address: str
    slot_bytes: int
    dist_init_method: str = ""


class StageLoaded(msgspec.Struct, tag="stage_loaded"):
    stage: int
    units: list[str]
    tensors_read: list[str]
    param_bytes: int
    kv_bytes: int
    load_seconds: float


class WorkerError(msgspec.Struct, tag="worker_error"):
    message: str


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


WorkerMessage = WorkerHello | LoadStage | StageLoaded | WorkerError | Shutdown

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WorkerMessage)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> WorkerMessage:
    return _decoder.decode(data)
