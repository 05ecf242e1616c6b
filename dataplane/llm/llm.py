"""The offline API: ``LLM(model, num_stages=...)`` and ``llm.generate(prompts, params)``.

An ``LLM`` is a client of the same runtime ``fpctl up`` runs: it hosts the controller and an
engine host on threads of this process (``InProcessCluster``), whose supervisor starts the same
worker processes; it deploys with ``DeployPipeline`` and refactors with ``RefactorPipeline``,
and ``generate`` submits straight to the in-process engine.
"""

from __future__ import annotations

import importlib
import math
import numbers
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Sequence as Seq

import psutil
import structlog

from common import events as ev
from common.errors import (
    CheckpointError,
    InvalidRequestError,
    PartitionError,
    PipelineError,
    RefactorAborted,
    RefactorRefused,
    RequestTimeout,
)
from common.logging import configure_logging
from common.model.context import resolve_max_model_len
from common.model.partition import partition_model
from common.model.spec import ModelSpec
from common.model.units import Layout, unit_names
from common.runtime import freeze_heap, new_session_dir
from controlplane.client import BusError
from controlplane.deploy.plan import check_deployable_transport
from controlplane.supervisor import worker_threads
from dataplane.engine.requests import normalize_prompts
from dataplane.engine.sampling_params import RequestOutput, SamplingParams
from dataplane.llm.in_process import InProcessCluster, WorkerOptions
from dataplane.llm.report import RefactorReport
from dataplane.models import adapter_for
from dataplane.models.checkpoint import CheckpointReader
from dataplane.stage.executor import resolve_dtype
from dataplane.transport import check_transport

PIPELINE_ID = "llm"
SPAWN_CAPACITY = 16  # workers a refactor may start beyond the first ones, unless ``max_workers`` says otherwise


def check_timeout(timeout_s) -> None:
    """``timeout_s`` is None (no deadline) or a finite number of seconds > 0; raises ``InvalidRequestError``."""
    if timeout_s is None:
        return
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not 0 < timeout_s < math.inf:
        raise InvalidRequestError(f"timeout_s must be None or a finite number of seconds > 0, got {timeout_s!r}")


class LLM:
    """A model served by a pipeline of stage processes, driven from this process.

    Invariants: after construction every stage is loaded and serving; ``generate``
    may be called from many threads at once and all their requests share one running
    batch; ``close()`` (or leaving the ``with`` block) stops every child process and thread.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        num_stages: int = 1,
        layout: Seq | None = None,
        transport: str = "shm",
        devices: Seq[str] | None = None,
        device_memory: Seq[int] | None = None,
        dtype: str = "float32",
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int = 256 << 20,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        start_timeout_s: float = 120.0,
        step_timeout_s: float = 60.0,
        spare_workers: int = 0,
        worker_memory: int | None = None,
        max_workers: int | None = None,
        param_cache_bytes: int | None = None,
        refactor_timeouts_s: dict[str, float] | None = None,
    ) -> None:
        if model is None:
            from dataplane.models.default_model import ensure_default_model

            model = ensure_default_model()
        self.model_dir = Path(model).resolve()
        self.transport = check_transport(transport)
        check_deployable_transport(self.transport)
        self.dtype = dtype
        resolve_dtype(dtype)
        self.spec = ModelSpec.from_dir(self.model_dir)
        self._check_tensors()
        self.unit_names = unit_names(self.spec.num_layers)
        self.max_model_len = resolve_max_model_len(self.spec, max_model_len)
        self.layout = self._layout(num_stages, layout, device_memory)
        stages = self.layout.num_stages
        self.devices = list(devices) if devices else [self._default_device(i) for i in range(stages)]
        if len(self.devices) != stages:
            raise InvalidRequestError(f"{len(self.devices)} devices given for {stages} stages")
        self.block_size = block_size
        self.worker_memory, self.max_workers = worker_memory, max_workers
        self.epoch = 0
        self._closed = False
        self._cluster: InProcessCluster | None = None
        if not structlog.is_configured():
            configure_logging("llm", level="warning")
        self._session_dir = new_session_dir("llm-")
        deploy = dict(
            pipeline_id=PIPELINE_ID,
            model_dir=str(self.model_dir),
            layout=self.layout.describe(self.unit_names),
            transport=self.transport,
            dtype=self.dtype,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            workers=[f"worker-{i}" for i in range(stages)],
            num_kv_blocks=num_kv_blocks or 0,
            kv_cache_bytes=kv_cache_bytes,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=max_num_batched_tokens or 0,
            step_timeout_s=step_timeout_s,
        )
        try:
            self._start(deploy, stages + spare_workers, start_timeout_s, param_cache_bytes, refactor_timeouts_s)
        except BaseException:
            self.close()
            raise

    def _check_tensors(self) -> None:
        reader = CheckpointReader(self.model_dir)
        adapter = adapter_for(self.spec, set(reader.weight_map))
        for unit in unit_names(self.spec.num_layers):
            missing = [n for n in adapter.tensor_names(unit) if not reader.has(n)]
            if missing:
                raise CheckpointError(f"checkpoint {str(self.model_dir)!r} lacks tensors of unit {unit}: {missing}")

    def _layout(self, num_stages: int, layout: Seq | None, device_memory: Seq[int] | None) -> Layout:
        if layout is not None:
            return Layout.from_spec(layout, self.unit_names)
        return partition_model(self.spec, num_stages, self.max_model_len // 2, device_memory)

    def _default_device(self, stage: int) -> str:
        return f"cuda:{stage}" if self.transport == "cuda_ipc" else "cpu"

    def _start(
        self,
        deploy: dict,
        num_workers: int,
        start_timeout_s: float,
        param_cache_bytes: int | None,
        refactor_timeouts_s: dict[str, float] | None,
    ) -> None:
        """Start the runtime and deploy ``deploy`` (``DeployPipeline`` fields) on it; the deploy plan sizes
        the KV cache and the micro-batch token budget where they were not given."""
        stages = self.layout.num_stages
        options = WorkerOptions(
            tuple(self.devices),
            "cuda" if self.transport == "cuda_ipc" else "cpu",
            self.worker_memory or psutil.virtual_memory().total,
            worker_threads(stages),
            param_cache_bytes,
        )
        spawn = max(0, self.max_workers - num_workers) if self.max_workers is not None else SPAWN_CAPACITY
        # the engine imports the tokenizer machinery once the workers are up; import it meanwhile
        warm_up = threading.Thread(target=lambda: importlib.import_module("transformers").AutoTokenizer, daemon=True)
        warm_up.start()
        self._cluster = InProcessCluster(
            self._session_dir, num_workers, options, spawn, start_timeout_s, refactor_timeouts_s
        )
        warm_up.join(start_timeout_s)
        self._finalizer = weakref.finalize(self, self._cluster.close)
        hosted = self._cluster.deploy(start_timeout_s, **deploy)
        self.engine, self.requests = hosted.engine, hosted.requests
        self.tokenizer = self.requests.tokenizer
        pipeline = self._cluster.controller.actor("coordinator").pipelines[PIPELINE_ID]
        self.num_kv_blocks = pipeline.plan.num_kv_blocks
        self.max_num_batched_tokens = pipeline.plan.max_num_batched_tokens
        self.stages = [pipeline.loaded[stage] for stage in sorted(pipeline.loaded)]
        freeze_heap()

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the worker processes serving or ready to serve stages, in start order."""
        return self._cluster.worker_pids() if self._cluster is not None and not self._closed else []

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        timeout_s: float | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or a list of integer token ids); blocks until all are done.

        Raises ``InvalidRequestError`` for a bad prompt or parameter before anything is queued,
        ``RequestFailed`` naming the reason when one request could not be served (the others are
        unaffected), ``RequestTimeout`` once ``timeout_s`` passed and ``PipelineError`` if the
        pipeline cannot serve at all. On a timeout, ``KeyboardInterrupt`` or any other exit before
        the end, the call's unfinished requests are aborted and their KV blocks freed."""
        if self._closed:
            raise PipelineError("this LLM is closed")
        prompts = normalize_prompts(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        params_list = [SamplingParams.from_dict(p) if isinstance(p, dict) else p for p in params_list]
        check_timeout(timeout_s)
        token_lists = []
        for index, prompt in enumerate(prompts):
            try:
                token_lists.append(self.requests.tokenize(prompt))
            except InvalidRequestError as exc:
                if len(prompts) == 1:
                    raise
                raise InvalidRequestError(f"prompt {index}: {exc}") from None
        done = threading.Semaphore(0)
        seqs = [
            self.requests.new_sequence(tokens, p, lambda _seq: done.release())
            for tokens, p in zip(token_lists, params_list)
        ]
        self.engine.submit(seqs)
        try:
            self._wait(seqs, done, timeout_s)
        except BaseException:  # a timeout, KeyboardInterrupt or a dead engine: nothing keeps decoding for nobody
            self.engine.abort([s.seq_id for s in seqs if not s.finished], reason="generate was interrupted")
            raise
        failed = next((s for s in seqs if s.error is not None), None)
        if failed is not None:
            raise failed.error
        return [self.requests.output(seq, prompt) for seq, prompt in zip(seqs, prompts)]

    def _wait(self, seqs: list, done: threading.Semaphore, timeout_s: float | None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        wait_s = lambda: 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))  # noqa: E731
        for _ in seqs:
            while not done.acquire(timeout=wait_s()):
                if not self.engine.thread.is_alive() and not all(s.finished for s in seqs):
                    raise PipelineError(f"the engine stopped: {self.engine.fatal_error}")
                if deadline is not None and time.monotonic() >= deadline:
                    raise RequestTimeout(f"generate did not finish within {timeout_s}s; its requests were aborted")

    def refactor(
        self,
        num_stages: int | None = None,
        layout: Seq | None = None,
        *,
        migrate: Seq[int] = (),
        precopy_bytes_per_s: float = 0.0,
        timeout_s: float = 600.0,
    ) -> RefactorReport:
        """Re-shape the serving pipeline while it serves: ``num_stages`` (split or merge), an explicit
        ``layout`` (rebalance, also cutting inside a layer), and/or ``migrate`` (stages to move to other
        worker processes). Safe to call from any thread while ``generate`` runs; requests in flight
        continue with their KV cache carried across. Pre-copy runs at most at ``precopy_bytes_per_s``
        (0: unlimited). Returns the report of a committed refactor; raises ``RefactorRefused`` when
        nothing was started and ``RefactorAborted`` (with ``.report``) when the old layout kept serving."""
        outcome = self._refactor_request(num_stages, layout, migrate, False, precopy_bytes_per_s, timeout_s)
        if outcome.outcome == "refused":
            raise RefactorRefused(outcome.reason)
        report = RefactorReport.from_outcome(outcome, clock_offset_s=time.perf_counter() - time.monotonic())
        if outcome.outcome == "aborted":
            raise RefactorAborted(f"refactor aborted, the old layout still serves: {outcome.reason}", report)
        self.layout, self.epoch = Layout.from_spec(outcome.target, self.unit_names), outcome.epoch
        return report

    def plan_refactor(
        self, num_stages: int | None = None, layout: Seq | None = None, *, migrate: Seq[int] = ()
    ) -> dict:
        """What ``refactor`` with these arguments would do (workers, moves, bytes, estimated stall), doing nothing.
        Raises ``RefactorRefused`` when it would be refused."""
        outcome = self._refactor_request(num_stages, layout, migrate, True, 0.0, 60.0)
        if outcome.outcome == "refused":
            raise RefactorRefused(outcome.reason)
        return {
            "kind": outcome.kind,
            "from": list(outcome.old_layout),
            "to": list(outcome.target),
            "workers": list(outcome.workers),
            "moves": list(outcome.moves),
            "weight_bytes_by_source": dict(outcome.weight_bytes_by_source),
            "kv_layers_moving": list(outcome.kv_layers_moved),
            "kv_bytes_estimate": outcome.kv_bytes,
            "stall_estimate_s": outcome.stall_estimate_s,
            "stage_memory": list(outcome.stage_memory),
        }

    def _refactor_request(
        self, num_stages, layout, migrate, dry_run: bool, precopy_bytes_per_s: float, timeout_s: float
    ) -> ev.RefactorOutcome:
        self._check_open()
        try:
            return self._cluster.request(
                ev.RefactorPipeline,
                timeout_s=timeout_s,
                pipeline_id=PIPELINE_ID,
                num_stages=num_stages,
                layout=self._layout_spec(layout),
                migrate=list(migrate),
                dry_run=dry_run,
                by="api",
                precopy_bytes_per_s=precopy_bytes_per_s,
                worker_memory=self.worker_memory or 0,
                max_workers=self.max_workers or 0,
            )
        except BusError as exc:
            raise PipelineError(f"the refactor request got no outcome: {exc}") from exc

    def _layout_spec(self, layout: Seq | None) -> list[str] | None:
        """A layout as ``"first..last"`` unit ranges, the form refactor requests carry."""
        if layout is None:
            return None
        try:
            return Layout.from_spec(layout, self.unit_names).describe(self.unit_names)
        except PartitionError as exc:
            raise RefactorRefused(f"bad target layout: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed or self._cluster is None:
            raise PipelineError("this LLM is closed")

    def refactor_status(self) -> dict | None:
        """The refactor in progress (id, phase, target epoch, kind, target workers' pids), or None."""
        self._check_open()
        controller = self._cluster.controller
        state = controller.actor("refactor").pipelines.get(PIPELINE_ID)
        run = state.active if state is not None else None
        if run is None:
            return None
        executing = controller.actor("refactor_executor").runs.get(run.refactor_id)
        workers = executing.new_workers() if executing is not None else []
        pids = [self._cluster.member_pid(w) for w in workers]
        return {
            "refactor_id": run.refactor_id,
            "phase": run.phase,
            "epoch": run.epoch,
            "kind": run.kind,
            "worker_pids": [pid for pid in pids if pid is not None],
        }

    @property
    def stage_layout(self) -> list[str]:
        """The serving layout as unit ranges, one per stage."""
        return self.layout.describe(self.unit_names)

    def num_free_kv_blocks(self) -> int:
        return self.engine.call(lambda: self.engine.scheduler.allocator.num_free)

    def close(self) -> None:
        """Stop the engine, every worker process and the in-process controller; idempotent."""
        if getattr(self, "_closed", True) and getattr(self, "_cluster", None) is None:
            return
        self._closed = True
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            self._finalizer.detach()
            cluster.close()
        shutil.rmtree(self._session_dir, ignore_errors=True)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
