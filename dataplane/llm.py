"""The offline API: ``LLM(model, num_stages=...)`` and ``llm.generate(prompts, params)``."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Sequence as Seq

import zmq

from common.errors import CheckpointError, InvalidRequestError, PartitionError, PipelineError, RefactorAborted, RefactorRefused
from common.runtime import freeze_heap, new_session_dir
from dataplane import worker_protocol as proto
from dataplane.engine.core import EngineCore
from dataplane.engine.scheduler import Scheduler
from dataplane.kv_cache import BlockAllocator, kv_bytes_per_block
from dataplane.models import adapter_for
from dataplane.models.checkpoint import CheckpointReader, read_config
from dataplane.models.spec import ModelSpec
from dataplane.offline_pipeline import OfflinePipeline
from dataplane.partitioner import partition_model
from dataplane.refactor_report import RefactorReport
from dataplane.refactor_service import RefactorService
from dataplane.requests import RequestFactory, load_tokenizer
from dataplane.sampling_params import RequestOutput, SamplingParams
from dataplane.stage import resolve_dtype
from dataplane.stage_processes import StageProcesses
from dataplane.transport import Inbox, check_transport, inbox_address, open_outbox
from dataplane.units import Layout, unit_names


class LLM:
    """A model served by a pipeline of stage processes, driven from this process.

    Invariants: after construction every stage is loaded and serving; ``generate``
    may be called from many threads at once and all their requests share one running
    batch; ``close()`` (or leaving the ``with`` block) stops every child process.
    """

    def __init__(self, model: str | Path | None = None, *, num_stages: int = 1, layout: Seq | None = None,
                 transport: str = "shm", devices: Seq[str] | None = None, device_memory: Seq[int] | None = None,
                 dtype: str = "float32", block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_bytes: int = 256 << 20, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 max_model_len: int | None = None, start_timeout_s: float = 120.0, step_timeout_s: float = 60.0,
                 spare_workers: int = 0, worker_memory: int | None = None, max_workers: int | None = None,
                 param_cache_bytes: int | None = None, refactor_timeouts_s: dict[str, float] | None = None) -> None:
        if model is None:
            from dataplane.tiny_model import ensure_tiny_model
            model = ensure_tiny_model()
        self.model_dir = Path(model).resolve()
        self.transport = check_transport(transport)
        self.dtype = dtype
        resolve_dtype(dtype)
        self.spec = ModelSpec.from_config(read_config(self.model_dir))
        self._check_tensors()
        self.unit_names = unit_names(self.spec.num_layers)
        self.max_model_len = min(max_model_len or self.spec.max_position_embeddings, self.spec.max_position_embeddings)
        self.layout = self._layout(num_stages, layout, device_memory)
        stages = self.layout.num_stages
        self.devices = list(devices) if devices else [self._default_device(i) for i in range(stages)]
        if len(self.devices) != stages:
            raise InvalidRequestError(f"{len(self.devices)} devices given for {stages} stages")
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks or self._default_kv_blocks(kv_cache_bytes, max_num_seqs)
        self.max_num_batched_tokens = max_num_batched_tokens or max(self.max_model_len, 2048)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.requests = RequestFactory(self.spec, self.tokenizer, self.max_model_len, block_size, self.num_kv_blocks)
        self.worker_memory, self.max_workers = worker_memory, max_workers
        self._closed = False
        self._context = zmq.Context()
        self._session_dir = new_session_dir("pipeline-")
        self._processes = None
        self._refactors = None
        try:
            self._start(dtype, start_timeout_s, step_timeout_s, max_num_seqs, spare_workers, param_cache_bytes)
            self._refactors = RefactorService(OfflinePipeline(self), phase_timeouts_s=refactor_timeouts_s)
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
        if self.transport in ("cuda_ipc", "nccl"):
            return f"cuda:{stage}"
        return "cpu"

    def _default_kv_blocks(self, kv_cache_bytes: int, max_num_seqs: int) -> int:
        layers_per_stage = max(sum(1 for u in self.layout.stage_units(s, self.unit_names) if u.endswith(".attn"))
                               for s in range(self.layout.num_stages))
        per_block = kv_bytes_per_block(self.block_size, self.spec.num_kv_heads, self.spec.head_dim,
                                       resolve_dtype(self.dtype).itemsize) * max(1, layers_per_stage)
        wanted = max_num_seqs * -(-self.max_model_len // self.block_size)
        return max(1, min(wanted, kv_cache_bytes // per_block))

    def _start(self, dtype: str, start_timeout_s: float, step_timeout_s: float, max_num_seqs: int,
               spare_workers: int, param_cache_bytes: int | None) -> None:
        stages = self.layout.num_stages
        self._inbox = Inbox(self._context, inbox_address("shm", str(self._session_dir), "engine"))
        self._processes = StageProcesses(stages + spare_workers, self._session_dir, self.transport, self._context,
                                         start_timeout_s, threads_per_worker=max(1, (os.cpu_count() or 1) // stages),
                                         param_cache_bytes=param_cache_bytes)
        self._processes.serving = set(range(stages))
        self.stage_workers = list(range(stages))
        self.epoch = 0
        self.slot_bytes = slot_bytes = max(1 << 20, self.max_num_batched_tokens * self.spec.hidden_size * 4 + 4096)
        dist_init = ""
        if self.transport in ("nccl", "gloo"):
            import socket
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                dist_init = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
        commands = [
            proto.LoadStage(stage, stages, 0, str(self.model_dir), self.layout.stage_units(stage, self.unit_names),
                            self.num_kv_blocks, self.block_size, dtype, self.devices[stage], self.transport,
                            self._processes.inboxes[stage + 1] if stage + 1 < stages else "",
                            self._inbox.address, slot_bytes, dist_init)
            for stage in range(stages)
        ]
        self.stages = self._processes.load(commands)
        self._to_first = open_outbox("tcp", self._context, self._processes.inboxes[0])
        scheduler = Scheduler(BlockAllocator(self.num_kv_blocks, self.block_size), stages,
                              max_num_seqs, self.max_num_batched_tokens)
        self.engine = EngineCore(scheduler, self._to_first, self._inbox, self._processes.raise_if_dead,
                                 step_timeout_s=step_timeout_s)
        freeze_heap()
        self.engine.start()

    @property
    def worker_pids(self) -> list[int]:
        return self._processes.pids if self._processes else []

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 timeout_s: float | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); blocks until all are done.

        Raises ``InvalidRequestError`` for a bad prompt before anything is queued and
        ``PipelineError`` if the pipeline cannot finish a request."""
        if self._closed:
            raise PipelineError("this LLM is closed")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        token_lists = [self.requests.tokenize(p) for p in prompts]
        done = threading.Semaphore(0)
        seqs = [self.requests.new_sequence(tokens, p, lambda _seq: done.release()) for tokens, p in zip(token_lists, params_list)]
        self.engine.submit(seqs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for seq in seqs:
            while not done.acquire(timeout=0.5):
                if not self.engine.thread.is_alive() and not all(s.finished for s in seqs):
                    raise PipelineError(f"the engine stopped: {self.engine.fatal_error}")
                if deadline is not None and time.monotonic() > deadline:
                    raise PipelineError(f"generate did not finish within {timeout_s}s")
        failed = next((s for s in seqs if s.error is not None), None)
        if failed is not None:
            raise failed.error
        return [self.requests.output(seq, prompt) for seq, prompt in zip(seqs, prompts)]

    def refactor(self, num_stages: int | None = None, layout: Seq | None = None, *, migrate: Seq[int] = (),
                 precopy_bytes_per_s: float = 0.0, timeout_s: float = 600.0) -> RefactorReport:
        """Re-shape the serving pipeline while it serves: ``num_stages`` (split or merge), an explicit
        ``layout`` (rebalance, also cutting inside a layer), and/or ``migrate`` (stages to move to other
        worker processes). Safe to call from any thread while ``generate`` runs; requests in flight
        continue with their KV cache carried across. Pre-copy runs at most at ``precopy_bytes_per_s``
        (0: unlimited). Returns the report of a committed refactor; raises ``RefactorRefused`` when
        nothing was started and ``RefactorAborted`` (with ``.report``) when the old layout kept serving."""
        waiter = self._refactor_service().submit(num_stages, self._layout_spec(layout), migrate,
                                                 bytes_per_s=precopy_bytes_per_s, timeout_s=timeout_s)
        outcome = waiter.outcome
        if outcome is None:
            raise PipelineError("the LLM was closed during the refactor")
        if outcome.outcome == "refused":
            raise RefactorRefused(outcome.reason)
        if outcome.outcome == "aborted":
            raise RefactorAborted(f"refactor aborted, the old layout still serves: {outcome.reason}", waiter.report)
        return waiter.report

    def plan_refactor(self, num_stages: int | None = None, layout: Seq | None = None, *,
                      migrate: Seq[int] = ()) -> dict:
        """What ``refactor`` with these arguments would do (workers, moves, bytes, estimated stall), doing nothing.
        Raises ``RefactorRefused`` when it would be refused."""
        waiter = self._refactor_service().submit(num_stages, self._layout_spec(layout), migrate, dry_run=True)
        if waiter.outcome is not None and waiter.outcome.outcome == "refused":
            raise RefactorRefused(waiter.outcome.reason)
        return waiter.plan

    def _layout_spec(self, layout: Seq | None) -> list[str] | None:
        """A layout as ``"first..last"`` unit ranges, the form refactor requests carry."""
        if layout is None:
            return None
        try:
            return Layout.from_spec(layout, self.unit_names).describe(self.unit_names)
        except PartitionError as exc:
            raise RefactorRefused(f"bad target layout: {exc}") from exc

    def _refactor_service(self) -> RefactorService:
        if self._closed or self._refactors is None:
            raise PipelineError("this LLM is closed")
        return self._refactors

    def refactor_status(self) -> dict | None:
        """The refactor in progress (id, phase, target epoch, kind, target workers' pids), or None."""
        return self._refactor_service().current()

    @property
    def stage_layout(self) -> list[str]:
        """The serving layout as unit ranges, one per stage."""
        return self.layout.describe(self.unit_names)

    def num_free_kv_blocks(self) -> int:
        return self.engine.call(lambda: self.engine.scheduler.allocator.num_free)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._refactors is not None:
            self._refactors.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
        if self._processes is not None:
            self._processes.close()
        current = engine.to_first_stage if engine is not None else None
        for endpoint in (current, getattr(self, "_to_first", None), getattr(self, "_inbox", None)):
            if endpoint is not None:
                endpoint.close()
        self._context.term()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

