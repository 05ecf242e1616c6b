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
    epoch: int = -1


class PrepareStage(msgspec.Struct, tag="prepare_stage"):
    """Build the stage this worker serves at ``epoch`` beside the one it serves now.

    ``sources`` names where each unit's weights come from: ``resident`` (this worker
    serves it now), ``cache`` (its host parameter cache), ``peer`` (sent by the worker
    that serves it, as ``UnitWeights`` on the data plane) or ``disk``."""

    epoch: int
    stage: int
    num_stages: int
    model_dir: str
    units: list[str]
    sources: dict[str, str]
    num_kv_blocks: int
    block_size: int
    dtype: str
    device: str
    next_address: str
    engine_address: str
    slot_bytes: int


class StagePrepared(msgspec.Struct, tag="stage_prepared"):
    epoch: int
    stage: int
    sources: dict[str, str]
    bytes_by_source: dict[str, int]
    kv_bytes_allocated: int
    seconds: float


class SendUnits(msgspec.Struct, tag="send_units"):
    """Send the weights of ``units`` (served here now) to the inbox at ``dest_address``."""

    epoch: int
    units: list[str]
    dest_address: str


class PrecopyKv(msgspec.Struct, tag="precopy_kv"):
    """Copy the KV slots ``slots`` (little-endian int64) of ``layer`` to ``dest_address``,
    at most ``bytes_per_s`` (0: as fast as possible), between micro-batches; with
    ``after_seal`` ≥ 0, only once an ``EpochSeal`` with ``launched >= after_seal`` has passed."""

    epoch: int
    transfer_id: int
    layer: int
    dest_address: str
    slots: bytes
    bytes_per_s: float = 0.0
    after_seal: int = -1


class KvReceived(msgspec.Struct, tag="kv_received"):
    epoch: int
    transfer_id: int
    num_slots: int
    nbytes: int


class ActivateEpoch(msgspec.Struct, tag="activate_epoch"):
    """Serve the stage prepared for ``epoch`` once the KV transfers in ``expect_slots``
    (transfer id → slot count) have all landed here and, on a worker serving a stage now,
    an ``EpochSeal`` with ``launched >= after_seal`` has passed; answer ``EpochActivated`` then."""

    epoch: int
    expect_slots: dict[int, int] = {}
    after_seal: int = -1


class EpochActivated(msgspec.Struct, tag="epoch_activated"):
    epoch: int


class CommitEpoch(msgspec.Struct, tag="commit_epoch"):
    epoch: int


class AbortEpoch(msgspec.Struct, tag="abort_epoch"):
    epoch: int


class EpochSettled(msgspec.Struct, tag="epoch_settled"):
    """A commit or abort of ``epoch`` is done; ``cached_units`` are now in the host parameter cache."""

    epoch: int
    outcome: str
    cached_units: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


WorkerMessage = (WorkerHello | LoadStage | StageLoaded | WorkerError | Shutdown | PrepareStage | StagePrepared
                 | SendUnits | PrecopyKv | KvReceived | ActivateEpoch | EpochActivated | CommitEpoch | AbortEpoch
                 | EpochSettled)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WorkerMessage)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> WorkerMessage:
    return _decoder.decode(data)
