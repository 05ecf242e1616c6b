"""The control bus's event catalogue: every message between FlexPipe processes, defined once.

Each event is a msgspec Struct encoded as a MessagePack map whose ``type`` field names
it (the tag), so a plain ``msgpack`` client can read and write any of them. Every event
carries the protocol version ``v`` and its ``sender``. A command carries ``cmd_id``,
unique per sender and increasing; its reply echoes it as ``reply_to``. Anything about a
pipeline carries ``pipeline_id`` and ``epoch``.
"""

from __future__ import annotations

from typing import Union

import msgspec

PROTOCOL_VERSION = 1


class Event(msgspec.Struct, kw_only=True, tag_field="type", forbid_unknown_fields=True):
    """Base of every control-bus event. Invariant: ``v == PROTOCOL_VERSION`` once decoded."""

    v: int = PROTOCOL_VERSION
    sender: str = ""


class Command(Event, kw_only=True):
    """An event that expects a reply echoing ``cmd_id``."""

    cmd_id: int


class Reply(Event, kw_only=True):
    reply_to: int


# ---- generic replies -------------------------------------------------------------------


class Ack(Reply, tag="ack"):
    pass


class ErrorReply(Reply, tag="error"):
    """A rejected message. ``reply_to`` is -1 when the message had no readable ``cmd_id``."""

    code: str
    message: str


# ---- workers ---------------------------------------------------------------------------


class DeviceInfo(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One device a worker serves: a GPU seen through NVML, or a declared virtual CPU device."""

    device_id: str
    kind: str
    name: str
    memory_total: int
    memory_free: int
    host: str
    rack: str = "rack0"
    nvlink_peers: list[str] = []


class RegisterWorker(Command, tag="register_worker"):
    worker_id: str
    host: str
    pid: int
    device: DeviceInfo


class WorkerRegistered(Reply, tag="worker_registered"):
    heartbeat_interval_s: float


class Heartbeat(Event, tag="heartbeat"):
    worker_id: str
    seq: int


class StageMetrics(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pipeline_id: str
    epoch: int
    stage: int
    queue_length: int
    busy_fraction: float
    kv_blocks_used: int
    kv_blocks_free: int
    tokens_per_s: float


class WorkerMetrics(Event, tag="worker_metrics"):
    worker_id: str
    stages: list[StageMetrics]


class LoadStage(Command, tag="load_stage"):
    """Load units of one pipeline stage and bind its data inbox (wired up later by ``ConnectStage``)."""

    pipeline_id: str
    epoch: int
    stage: int
    num_stages: int
    model_dir: str
    units: list[str]
    num_kv_blocks: int
    block_size: int
    dtype: str
    transport: str


class StageLoaded(Reply, tag="stage_loaded"):
    """A stage is loaded; ``tensors_read`` names the checkpoint tensors it read (a stage reads only its own)."""

    pipeline_id: str
    epoch: int
    stage: int
    inbox_address: str
    param_bytes: int
    kv_bytes: int
    load_seconds: float
    tensors_read: list[str] = []


class ConnectStage(Command, tag="connect_stage"):
    """Point a loaded stage at its successor (empty for the last stage) and at the engine."""

    pipeline_id: str
    epoch: int
    next_address: str
    engine_address: str
    slot_bytes: int


class UnloadStage(Command, tag="unload_stage"):
    pipeline_id: str


# ---- engine hosts ----------------------------------------------------------------------


class RegisterEngineHost(Command, tag="register_engine_host"):
    """An engine host joins; ``http_address`` is where its gateway serves the OpenAI API ("" = none)."""

    host_id: str
    host: str
    pid: int
    request_address: str
    http_address: str = ""


class PrepareEngine(Command, tag="prepare_engine"):
    """Create the engine of a pipeline and bind the inbox its last stage answers to.

    ``max_model_len`` caps a request's prompt + output tokens, ``max_num_batched_tokens`` the
    tokens of one micro-batch; a micro-batch unanswered for ``step_timeout_s`` fails the pipeline."""

    pipeline_id: str
    epoch: int
    model_dir: str
    num_stages: int
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int
    transport: str
    max_model_len: int
    max_num_batched_tokens: int
    step_timeout_s: float = 60.0


class EnginePrepared(Reply, tag="engine_prepared"):
    pipeline_id: str
    inbox_address: str


class StartEngine(Command, tag="start_engine"):
    pipeline_id: str
    epoch: int
    first_stage_address: str


class StopEngine(Command, tag="stop_engine"):
    pipeline_id: str


class EngineMetrics(Event, tag="engine_metrics"):
    """One engine's load: requests, KV blocks, ``kv_tokens`` (positions with KV written, summed over
    running requests), ``step_s`` (the smoothed time a micro-batch takes through the pipeline) and
    the requests aborted (caller gave up) and failed on their own since the engine started."""

    host_id: str
    pipeline_id: str
    epoch: int
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    tokens_per_s: float
    kv_tokens: int = 0
    step_s: float = 0.0
    requests_aborted: int = 0
    requests_failed: int = 0


# ---- operators ---------------------------------------------------------------------------


class StatusRequest(Command, tag="status"):
    pass


class WorkerView(msgspec.Struct, kw_only=True):
    worker_id: str
    state: str
    host: str
    pid: int
    device: DeviceInfo
    last_heartbeat_age_s: float
    stages: list[StageMetrics]


class EngineHostView(msgspec.Struct, kw_only=True):
    host_id: str
    state: str
    pid: int
    request_address: str
    http_address: str = ""


class StageView(msgspec.Struct, kw_only=True):
    stage: int
    worker_id: str
    units: list[str]
    queue_length: int = 0
    busy_fraction: float = 0.0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0


class PipelineView(msgspec.Struct, kw_only=True):
    pipeline_id: str
    state: str
    epoch: int
    model_dir: str
    engine_host: str
    stages: list[StageView]
    reason: str = ""


class StatusReply(Reply, tag="status_reply"):
    """The cluster as the monitor sees it; ``policy`` is the autoscaling policy's latest view (None: no policy)."""

    workers: list[WorkerView]
    engine_hosts: list[EngineHostView]
    pipelines: list[PipelineView]
    rejected_messages: int
    policy: PolicyView | None = None


class DeployPipeline(Command, tag="deploy"):
    """Deploy a model as a pipeline: ``num_stages`` stages cut by the partitioner, or an explicit ``layout``.

    ``workers`` pins stage k to ``workers[k]`` (empty: the allocator places them). The KV cache
    has ``num_kv_blocks`` blocks, or (0) as many as ``kv_cache_bytes`` per stage holds for
    ``max_num_seqs`` requests; ``max_model_len`` 0 means the model's own context, and
    ``max_num_batched_tokens`` 0 means max(context, 2048). With ``replica_of``, every setting but the id, the
    stage count and the layout is copied from that pipeline's deploy (a replica; ``model_dir`` may be empty)."""

    pipeline_id: str
    model_dir: str
    num_stages: int = 0
    layout: list[str] = []
    transport: str = "shm"
    dtype: str = "float32"
    block_size: int = 16
    max_num_seqs: int = 64
    workers: list[str] = []
    num_kv_blocks: int = 0
    kv_cache_bytes: int = 256 << 20
    max_model_len: int = 0
    max_num_batched_tokens: int = 0
    step_timeout_s: float = 60.0
    replica_of: str = ""


class DeployAccepted(Reply, tag="deploy_accepted"):
    pipeline_id: str


class UndeployPipeline(Command, tag="undeploy"):
    pipeline_id: str


class ShutdownRequest(Command, tag="shutdown"):
    """Stops a benchmark server. Services stop on SIGTERM only, never on a bus message."""


# ---- notifications (controller -> subscribers, and the log) ------------------------------


class WorkerLost(Event, tag="worker_lost"):
    """A member is gone: silent for ``silent_for_s``, or its process exited (``reason`` says how)."""

    worker_id: str
    silent_for_s: float
    reason: str = ""


# ---- supervisors (start worker processes on demand and report their exits) ---------------------


class RegisterSupervisor(Command, tag="register_supervisor"):
    """A process supervisor on ``host`` that can start up to ``spawn_capacity`` more workers."""

    supervisor_id: str
    host: str
    pid: int
    spawn_capacity: int


class SpawnWorkers(Command, tag="spawn_workers"):
    """Start ``count`` more worker processes; answered by ``WorkersSpawned`` once started (they register themselves)."""

    count: int


class WorkersSpawned(Reply, tag="workers_spawned"):
    worker_ids: list[str]


class MemberExited(Event, tag="member_exited"):
    """A supervised worker or engine host process exited with ``exit_code`` (negative: killed by that signal)."""

    member_id: str
    pid: int
    exit_code: int


class PipelineStateChanged(Event, tag="pipeline_state"):
    pipeline_id: str
    epoch: int
    state: str
    reason: str = ""


# ---- the engine host's request endpoint (used by fpctl generate and the gateway) -----------


class GenerateRequest(Command, tag="generate"):
    pipeline_id: str
    prompt: str = ""
    prompt_token_ids: list[int] = []
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False


class CancelGenerate(Command, tag="cancel_generate"):
    """Abort the ``GenerateRequest`` whose ``cmd_id`` is ``request_id``, sent by the same client; the
    request ends with a final chunk of finish reason ``abort`` and its KV blocks are freed."""

    request_id: int


class TokenChunk(Reply, tag="tokens"):
    """Tokens of one request as they arrive; the last chunk has ``finish_reason`` set."""

    token_ids: list[int]
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


# ---- between actors (co-hosted in the controller, or over the bus when an actor runs alone) ----


class PlaceStages(Command, tag="place_stages"):
    """Ask the allocator for one device per stage; ``stage_memory[k]`` bytes must fit on stage k's device.
    With ``workers``, stage k must go to ``workers[k]`` (checked and reserved, not chosen). ``model`` (its
    checkpoint directory) lets the allocator prefer servers that cached the model's weights for another
    pipeline (Eq. 13)."""

    pipeline_id: str
    stage_memory: list[int]
    workers: list[str] = []
    model: str = ""


class PlacementDecided(Reply, tag="placement"):
    """``devices[k]`` is the worker id for stage k; empty with a ``reason`` when refused."""

    pipeline_id: str
    devices: list[str]
    reason: str = ""


class ReleasePlacement(Event, tag="release_placement"):
    pipeline_id: str


class MessageRejected(Event, tag="message_rejected"):
    """A bus shell rejected a message from ``peer`` (counted by the monitor)."""

    code: str
    peer: str


class PipelineUpdated(Event, tag="pipeline_updated"):
    """The coordinator's current view of one pipeline, for the monitor's status answers."""

    pipeline: PipelineView
    removed: bool = False


# ---- inflight refactoring ---------------------------------------------------------------

REFACTOR_PHASES = ("PLAN", "PREPARE", "PRECOPY", "SWITCH", "COMMIT", "ABORT")


class RefactorPipeline(Command, tag="refactor"):
    """Re-shape a serving pipeline: a new stage count, an explicit ``layout`` of unit
    ranges, and/or ``migrate`` (stage indices to move to other workers). With ``dry_run``
    only PLAN runs and the reply describes what would move."""

    pipeline_id: str
    num_stages: int | None = None
    layout: list[str] | None = None
    migrate: list[int] = []
    dry_run: bool = False
    by: str = "api"
    precopy_bytes_per_s: float = 0.0
    worker_memory: int = 0
    max_workers: int = 0


class RefactorPhase(Event, tag="refactor_phase"):
    """The coordinator tells the refactor executor to run ``phase`` towards ``epoch``."""

    pipeline_id: str
    refactor_id: int
    epoch: int
    phase: str


class SwitchTiming(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """SWITCH as the engine measured it, in seconds on its host's monotonic clock.

    ``stall_s``: the engine launched nothing, from the drained pipeline to the first micro-batch of
    the new epoch; ``switch_s``: from the moment launching stopped (adds the drain);
    ``requests_carried``: requests holding KV when the layout switched."""

    stall_s: float = 0.0
    switch_s: float = 0.0
    paused_at: float = 0.0
    resumed_at: float = 0.0
    requests_carried: int = 0


class RefactorPhaseDone(Event, tag="refactor_phase_done"):
    """The executor finished (``ok``) or failed a phase, with what it moved: PREPARE the weights (by
    source, per unit) onto ``workers``; PRECOPY ``kv_bytes`` in ``precopy_rounds``; SWITCH the KV delta
    and the ``switch`` timing."""

    pipeline_id: str
    refactor_id: int
    epoch: int
    phase: str
    ok: bool
    reason: str = ""
    duration_s: float = 0.0
    weight_bytes: int = 0
    weight_bytes_by_source: dict[str, int] = {}
    unit_sources: dict[str, str] = {}
    workers: list[str] = []
    kv_bytes: int = 0
    precopy_rounds: int = 0
    switch: SwitchTiming | None = None


class RefactorOutcome(Reply, tag="refactor_outcome"):
    """How a refactor request ended: ``planned`` (dry run), ``committed``, ``aborted`` or ``refused``.
    ``epoch`` is the epoch serving afterwards; ``phase_seconds`` maps each phase run to its duration;
    ``switch`` is SWITCH as the engine measured it (None when no SWITCH completed)."""

    pipeline_id: str
    refactor_id: int
    epoch: int
    outcome: str
    reason: str = ""
    kind: str = ""
    from_epoch: int = 0
    old_layout: list[str] = []
    target: list[str] = []
    phase_seconds: dict[str, float] = {}
    weight_bytes: int = 0
    weight_bytes_by_source: dict[str, int] = {}
    unit_sources: dict[str, str] = {}
    kv_layers_moved: list[int] = []
    kv_bytes: int = 0
    kv_bytes_precopy: int = 0
    kv_bytes_delta: int = 0
    precopy_rounds: int = 0
    switch: SwitchTiming | None = None
    workers: list[str] = []
    moves: list[str] = []
    stage_memory: list[int] = []
    stall_estimate_s: float = 0.0

    @property
    def stall_s(self) -> float:
        return self.switch.stall_s if self.switch is not None else 0.0

    @property
    def switch_s(self) -> float:
        return self.switch.switch_s if self.switch is not None else 0.0

    @property
    def requests_carried(self) -> int:
        return self.switch.requests_carried if self.switch is not None else 0


class PipelineReshaped(Event, tag="pipeline_reshaped"):
    """A refactor switched ``pipeline_id`` to ``epoch``: stage k has ``stage_units[k]`` on ``workers[k]``,
    reading ``stage_inboxes[k]`` and holding ``stage_memory[k]`` bytes (the allocator's new reservation)."""

    pipeline_id: str
    epoch: int
    workers: list[str]
    stage_units: list[list[str]]
    stage_inboxes: list[str]
    stage_memory: list[int] = []


class RefactorHold(Event, tag="refactor_hold"):
    """While a refactor of ``pipeline_id`` runs, its target puts a stage of ``stage_memory[k]`` bytes
    on ``workers[k]``; the allocator holds what that adds to the pipeline's reservation, so no
    placement takes it meanwhile. Empty lists (an abort) or a ``PipelineReshaped`` release it."""

    pipeline_id: str
    workers: list[str] = []
    stage_memory: list[int] = []


# ---- inflight refactoring: a cluster worker's stages across epochs -------------------------
# Commands the coordinator sends a worker while it re-shapes a pipeline. Weights and KV move
# on the data plane between workers; only these small events travel on the bus.


class OpenStageInbox(Command, tag="open_stage_inbox"):
    """Bind (or name, when it exists) this worker's data inbox for ``pipeline_id``, so peers can
    address it before the stage of ``epoch`` is prepared here."""

    pipeline_id: str
    epoch: int
    transport: str


class StageInboxOpened(Reply, tag="stage_inbox_opened"):
    pipeline_id: str
    epoch: int
    inbox_address: str


class PrepareStageEpoch(Command, tag="prepare_stage_epoch"):
    """Build the stage this worker serves at ``epoch`` beside the one it serves now.

    ``sources`` maps each unit to where its weights come from: ``resident`` (served here
    now), ``cache`` (host parameter cache), ``peer`` (sent by its owner on ``SendStageUnits``)
    or ``disk``. Answered by ``StageEpochPrepared`` once the stage is built."""

    pipeline_id: str
    epoch: int
    stage: int
    num_stages: int
    model_dir: str
    units: list[str]
    sources: dict[str, str]
    num_kv_blocks: int
    block_size: int
    dtype: str
    next_address: str
    engine_address: str
    slot_bytes: int


class StageEpochPrepared(Reply, tag="stage_epoch_prepared"):
    pipeline_id: str
    epoch: int
    stage: int
    sources: dict[str, str]
    bytes_by_source: dict[str, int]
    kv_bytes_allocated: int
    seconds: float


class SendStageUnits(Command, tag="send_stage_units"):
    """Send the weights of ``units`` (served here now) to the inbox at ``dest_address``; answered by ``Ack``."""

    pipeline_id: str
    epoch: int
    units: list[str]
    dest_address: str


class CopyStageKv(Command, tag="copy_stage_kv"):
    """Copy the KV ``slots`` (little-endian int64) of ``layer`` to ``dest_address`` between
    micro-batches, at most ``bytes_per_s`` (0: as fast as possible), and with ``after_seal`` >= 0
    only once the engine's seal of that many launched micro-batches has passed; answered by
    ``Ack`` when queued."""

    pipeline_id: str
    epoch: int
    transfer_id: int
    layer: int
    dest_address: str
    slots: bytes
    bytes_per_s: float = 0.0
    after_seal: int = -1


class StageKvCopied(Event, tag="stage_kv_copied"):
    """KV slots of transfer ``transfer_id`` landed at worker ``worker_id``."""

    pipeline_id: str
    epoch: int
    worker_id: str
    transfer_id: int
    num_slots: int
    nbytes: int


class KvTransfer(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    transfer_id: int
    num_slots: int


class ActivateStageEpoch(Command, tag="activate_stage_epoch"):
    """Serve the stage prepared for ``epoch`` once every transfer in ``expect`` has landed here
    and, on a worker serving the pipeline now, the seal ``after_seal`` (when >= 0) has passed;
    answered by ``StageEpochActivated`` then."""

    pipeline_id: str
    epoch: int
    expect: list[KvTransfer] = []
    after_seal: int = -1


class StageEpochActivated(Reply, tag="stage_epoch_activated"):
    pipeline_id: str
    epoch: int


class CommitStageEpoch(Command, tag="commit_stage_epoch"):
    pipeline_id: str
    epoch: int


class AbortStageEpoch(Command, tag="abort_stage_epoch"):
    pipeline_id: str
    epoch: int


class StageEpochSettled(Reply, tag="stage_epoch_settled"):
    """A commit or abort of ``epoch`` is done (``outcome``); ``cached_units`` went to the host parameter cache."""

    pipeline_id: str
    epoch: int
    outcome: str
    cached_units: list[str] = []


class StageEpochFailed(Event, tag="stage_epoch_failed"):
    """Work of ``epoch`` already acknowledged (a KV send, a stage built from received weights) failed."""

    pipeline_id: str
    epoch: int
    worker_id: str
    reason: str


class PauseEngine(Command, tag="pause_engine"):
    """Stop launching micro-batches and wait, at most ``timeout_s``, until none is in flight.
    With ``seal``, answer as soon as launching stopped: a seal follows the last micro-batch
    down the pipeline, the snapshot counts what the in-flight micro-batches write, and the
    drain completes before a ``ResumeEngine`` at a new epoch takes effect."""

    pipeline_id: str
    timeout_s: float
    seal: bool = False


class EnginePaused(Reply, tag="engine_paused"):
    """The engine is parked (or, after a sealed pause, stopped launching). Running requests, as
    parallel lists: their ids, block tables and how many positions have KV written (so the
    coordinator can name the KV slots to move); ``launched`` is the seal's count, -1 unsealed."""

    pipeline_id: str
    epoch: int
    seq_ids: list[int]
    block_tables: list[list[int]]
    num_computed: list[int]
    launched: int = -1


class SnapshotKv(Command, tag="snapshot_kv"):
    """Which KV the running requests hold now, without pausing; answered by ``KvSnapshot``."""

    pipeline_id: str


class KvSnapshot(Reply, tag="kv_snapshot"):
    """Like ``EnginePaused``'s lists, taken between two iterations of a serving engine."""

    pipeline_id: str
    epoch: int
    seq_ids: list[int]
    block_tables: list[list[int]]
    num_computed: list[int]


class ResumeEngine(Command, tag="resume_engine"):
    """Leave the pause; with ``first_stage_address`` set, feed that stage at ``epoch`` with
    ``num_stages`` stages from now on (empty: resume unchanged). Answered by ``EngineResumed``."""

    pipeline_id: str
    epoch: int
    first_stage_address: str = ""
    num_stages: int = 0


class EngineResumed(Reply, tag="engine_resumed"):
    pipeline_id: str
    epoch: int
    switch: SwitchTiming


class AwaitRefill(Command, tag="await_refill"):
    """Answer (``Ack``) once the pipeline answered a micro-batch per stage since the last resume, has
    nothing to do, or ``timeout_s`` passed; COMMIT lets the new layout refill before old stages retire."""

    pipeline_id: str
    timeout_s: float


# ---- traffic and the autoscaling policy ----------------------------------------------------


class Arrival(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, array_like=True):
    """One request admitted by a gateway ``age_s`` seconds before its report was sent."""

    age_s: float
    model_dir: str
    prompt_tokens: int


class Completion(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, array_like=True):
    """One finished request: output tokens, time to first token and mean time per output token after it (s)."""

    model_dir: str
    output_tokens: int
    ttft_s: float
    tpot_s: float


class TrafficReport(Event, tag="traffic_report"):
    """What a gateway admitted and finished since its last report (sent with its heartbeat, about once a second)."""

    host_id: str
    arrivals: list[Arrival] = []
    completions: list[Completion] = []


class PipelineLoad(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One replica (pipeline) of a model as the monitor sees it: its stages' units and input queues, the busy
    fraction of each stage, requests running and waiting in its engine, the share of KV blocks in use."""

    pipeline_id: str
    state: str
    epoch: int
    stage_units: list[list[str]]
    stage_queues: list[int] = []
    stage_busy: list[float] = []
    stage_workers: list[str] = []
    running: int = 0
    waiting: int = 0
    kv_used_fraction: float = 0.0
    engine_host: str = ""


class CongestedStage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A stage whose input queue grew in each of the last intervals: ``queue_lengths`` oldest first."""

    pipeline_id: str
    stage: int
    queue_lengths: list[int]


class TrafficSnapshot(Event, tag="traffic_snapshot"):
    """The monitor's request-pattern analysis of one model at ``at`` (controller clock, s), over ``window_s``.

    ``arrival_rate``: requests/s; ``cv``: coefficient of variation of inter-arrival times in the window;
    ``trend``: d(rate)/dt in requests/s per second; token counts and latencies are over the window's requests
    (p50/p90 prompt, mean output; TTFT/TPOT p50 and p99 in seconds)."""

    model_dir: str
    at: float
    window_s: float
    arrivals: int
    arrival_rate: float
    cv: float
    trend: float
    prompt_tokens_p50: float = 0.0
    prompt_tokens_p90: float = 0.0
    output_tokens_mean: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    tpot_p50_s: float = 0.0
    tpot_p99_s: float = 0.0
    pipelines: list[PipelineLoad] = []
    congested: list[CongestedStage] = []


class CandidateScore(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One granularity as the policy weighed it: K stages, throughput T (tokens/s) and latency L (s per token)
    from a profile (``measured``) or the cost model, the CV it suits, its Eq. 4 score and Eq. 5 replicas."""

    num_stages: int
    throughput: float
    latency_s: float
    suited_cv: float
    score: float
    replicas: int
    measured: bool = False
    placeable: bool = True


class PolicyDecision(Event, tag="policy_decision"):
    """One decision of the policy, with what it saw and how it ended.

    ``kind``: ``granularity`` (split or merge one replica), ``scale_out``, ``scale_in``, ``rebalance`` or
    ``held`` (a change the cluster cannot place: ``reason`` says why). ``why``: the rule and the numbers that
    asked for the change (Eq. 4/5/11, the SLO). ``queues``: per replica, [requests waiting, each stage's
    input queue]. ``at``: the controller's monotonic clock (s), like ``PolicyView.at``. ``outcome``: ``issued``,
    then ``committed`` / ``ready`` / ``removed`` / ``refused`` / ``failed``; ``held`` decisions are final.
    ``duration_s``: from issue to outcome (a replica's cold start for ``scale_out``)."""

    seq: int
    at: float
    model_dir: str
    kind: str
    action: str
    pipeline_id: str = ""
    stages_from: int = 0
    stages_to: int = 0
    replicas_from: int = 0
    replicas_to: int = 0
    arrival_rate: float = 0.0
    cv: float = 0.0
    trend: float = 0.0
    queues: dict[str, list[int]] = {}
    ttft_p99_s: float = 0.0
    tpot_p99_s: float = 0.0
    candidates: list[CandidateScore] = []
    queue_stages: int = 0
    why: str = ""
    outcome: str = "issued"
    reason: str = ""
    duration_s: float = 0.0
    placement: list[str] = []


class ModelPolicyView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The policy's current view of one model."""

    model_dir: str
    stages: list[int]
    replicas: int
    target_stages: int
    target_replicas: int
    arrival_rate: float
    cv: float
    trend: float
    cooldown_left_s: float
    in_flight: str = ""
    decisions_by_kind: dict[str, int] = {}


class PolicyView(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The policy's mode, whether an operator paused it, its models, how many decisions it took, and ``at``: the
    controller's clock when the view was made (decisions' ``at`` are on the same clock)."""

    mode: str
    paused: bool
    models: list[ModelPolicyView] = []
    decisions: int = 0
    at: float = 0.0


class PolicyViewUpdated(Event, tag="policy_view"):
    """The policy's view after each decision round, kept by the monitor for status answers."""

    view: PolicyView


class PolicyEventsRequest(Command, tag="policy_events"):
    """The policy's decisions with ``seq > after`` (at most ``limit``, newest last)."""

    after: int = 0
    limit: int = 200


class PolicyEventsReply(Reply, tag="policy_events_reply"):
    decisions: list[PolicyDecision]
    view: PolicyView


class PolicyControl(Command, tag="policy_control"):
    """``pause`` (decide nothing; refactors in progress finish) or ``resume`` the policy; answered by
    ``PolicyEventsReply`` with no decisions and the new view."""

    action: str


class DrainPipeline(Command, tag="drain_pipeline"):
    """The engine host's gateway stops routing new requests to ``pipeline_id`` (running ones finish); Ack.
    With ``last``, it is the model's last replica (scaled to zero): requests for the model get 503 with
    Retry-After instead of 404, and count as arrivals, until a replica is back."""

    pipeline_id: str
    last: bool = False


ANY_EVENT = Union[  # noqa: UP007 (a runtime union of every event: msgspec decodes by its tag)
    Ack,
    ErrorReply,
    RegisterWorker,
    WorkerRegistered,
    Heartbeat,
    WorkerMetrics,
    LoadStage,
    StageLoaded,
    ConnectStage,
    UnloadStage,
    RegisterEngineHost,
    PrepareEngine,
    EnginePrepared,
    StartEngine,
    StopEngine,
    EngineMetrics,
    StatusRequest,
    StatusReply,
    DeployPipeline,
    DeployAccepted,
    UndeployPipeline,
    ShutdownRequest,
    WorkerLost,
    PipelineStateChanged,
    GenerateRequest,
    CancelGenerate,
    TokenChunk,
    PlaceStages,
    PlacementDecided,
    ReleasePlacement,
    PipelineUpdated,
    MessageRejected,
    RefactorPipeline,
    RefactorPhase,
    RefactorPhaseDone,
    RefactorOutcome,
    OpenStageInbox,
    StageInboxOpened,
    PrepareStageEpoch,
    StageEpochPrepared,
    SendStageUnits,
    CopyStageKv,
    StageKvCopied,
    ActivateStageEpoch,
    StageEpochActivated,
    CommitStageEpoch,
    AbortStageEpoch,
    StageEpochSettled,
    StageEpochFailed,
    PauseEngine,
    EnginePaused,
    ResumeEngine,
    PipelineReshaped,
    SnapshotKv,
    KvSnapshot,
    RefactorHold,
    EngineResumed,
    AwaitRefill,
    RegisterSupervisor,
    SpawnWorkers,
    WorkersSpawned,
    MemberExited,
    TrafficReport,
    TrafficSnapshot,
    PolicyDecision,
    PolicyViewUpdated,
    PolicyEventsRequest,
    PolicyEventsReply,
    PolicyControl,
    DrainPipeline,
]

CATALOGUE: dict[str, type[Event]] = {cls.__struct_config__.tag: cls for cls in ANY_EVENT.__args__}
