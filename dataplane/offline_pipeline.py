"""The offline ``LLM``'s pipeline as the refactor executor sees it: workers, layout, epoch, sizes."""

from __future__ import annotations

from typing import Sequence

from dataplane.partitioner import partition_model
from dataplane.refactor_plan import ModelSizes
from dataplane.units import Layout


class OfflinePipeline:
    """A view of an ``LLM`` for refactoring, plus the state a refactor changes.

    Invariants: ``stage_workers[s]`` serves stage ``s`` of ``layout`` at ``epoch``, and
    exactly those workers are the ones whose death fails the engine; ``adopt`` is the only
    place the three change together.
    """

    def __init__(self, llm) -> None:
        self.llm = llm
        self.cached_units: dict[int, set[str]] = {}

    def __getattr__(self, name: str):
        if name in ("transport", "unit_names", "model_dir", "num_kv_blocks", "block_size", "dtype", "engine",
                    "worker_memory", "max_workers", "layout", "stage_workers", "epoch", "slot_bytes"):
            return getattr(self.llm, name)
        raise AttributeError(name)

    @property
    def processes(self):
        return self.llm._processes

    @property
    def context(self):
        return self.llm._context

    @property
    def engine_address(self) -> str:
        return self.llm._inbox.address

    def device_of(self, worker: int) -> str:
        return self.llm._default_device(worker)

    def target_layout(self, num_stages: int | None, layout: Sequence[str] | None) -> Layout:
        llm = self.llm
        if layout:
            return Layout.from_spec(layout, llm.unit_names)
        if not num_stages or num_stages < 1:
            raise ValueError("a refactor needs a stage count or a layout")
        return partition_model(llm.spec, num_stages, llm.max_model_len // 2)

    def model_sizes(self) -> ModelSizes:
        llm = self.llm
        return ModelSizes.of(llm.spec, llm.dtype, llm.block_size, llm.num_kv_blocks)

    def kv_tokens_in_use(self) -> int:
        engine = self.llm.engine
        return sum(computed for _, _, computed in engine.call(engine.scheduler.kv_in_use))

    def step_estimate_s(self) -> float:
        return self.llm.engine.step_seconds

    def adopt(self, layout: Layout, workers: list[int], epoch: int) -> None:
        llm = self.llm
        llm.layout, llm.stage_workers, llm.epoch = layout, list(workers), epoch
        llm._processes.serving = set(workers)

    def note_cached(self, worker: int, units: list[str]) -> None:
        self.cached_units.setdefault(worker, set()).update(units)
