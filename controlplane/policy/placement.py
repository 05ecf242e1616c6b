"""Whether the cluster can take a change before the policy asks for it ("never worse than doing nothing").

The check asks the allocator (``Allocator.fits``) on its current graph and reservations, without reserving:
a replica of K stages needs K distinct devices with room for its stages; a refactor of a pipeline to K
stages is checked as if that pipeline's own reservation were free again.
"""

from __future__ import annotations

from functools import lru_cache

from common import events as ev
from common.errors import FlexPipeError
from controlplane.allocator import Allocator
from controlplane.deploy.plan import plan_pipeline


@lru_cache(maxsize=256)
def stage_memory_of(model_dir: str, num_stages: int) -> tuple[int, ...]:
    """Bytes per stage of ``model_dir`` deployed at ``num_stages`` with the deploy defaults (weights, KV, reserve)."""
    request = ev.DeployPipeline(cmd_id=0, pipeline_id="probe", model_dir=model_dir, num_stages=num_stages)
    return tuple(plan_pipeline(request).stage_memory)


class AllocatorCapacity:
    """``capacity(model_dir, num_stages, pipeline_id) -> reason``: "" when the allocator can place it now."""

    def __init__(self, allocator: Allocator, memory_of=stage_memory_of) -> None:
        self.allocator = allocator
        self.memory_of = memory_of

    def __call__(self, model_dir: str, num_stages: int, pipeline_id: str) -> str:
        try:
            memory = list(self.memory_of(model_dir, num_stages))
        except FlexPipeError as exc:
            return f"cannot size {num_stages} stages: {exc}"
        return self.allocator.fits(memory, pipeline_id)
