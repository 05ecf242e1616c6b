"""What the policy remembers of each model between decisions."""

from __future__ import annotations

from dataclasses import dataclass, field

from common import events as ev
from controlplane.policy.candidates import Candidate


@dataclass
class InFlight:
    """The one change of a model being carried out: ``kind`` as in ``PolicyDecision``, the command waited for
    (``cmd_id``; 0 once answered and the policy waits on the cluster's state instead), and since when. A
    scale-in drains first (``idle_snapshots`` counts snapshots with nothing running) and then ``undeploying``."""

    decision: ev.PolicyDecision
    cmd_id: int
    pipeline_id: str
    started: float
    idle_snapshots: int = 0
    undeploying: bool = False


@dataclass
class ModelState:
    """One model: its candidates, the granularity it is steered to, stability counters and its last snapshot."""

    model_dir: str
    candidates: list[Candidate]
    target_stages: int = 0
    last_change: float = float("-inf")
    proposal: int = 0
    proposal_count: int = 0
    under_capacity_since: float | None = None
    in_flight: InFlight | None = None
    draining: set[str] = field(default_factory=set)
    snapshot: ev.TrafficSnapshot | None = None
    target_replicas: int = 0
    decisions_by_kind: dict[str, int] = field(default_factory=dict)
    held: dict[str, float] = field(default_factory=dict)  # action -> when it was last recorded as held
    last_replica: str = ""  # a replica seen last: the template of new ones, also after scaling to zero
    scaled_to_zero: bool = False  # the policy removed the last replica itself (an operator's undeploy is final)
    added: set[str] = field(default_factory=set)  # replicas the policy deployed (removed before an operator's)
    target_why: str = ""  # why the target granularity is what it is

    def serving(self) -> list[ev.PipelineLoad]:
        """Replicas taking requests: READY and not being drained."""
        pipelines = self.snapshot.pipelines if self.snapshot else []
        return [p for p in pipelines if p.state == "READY" and p.pipeline_id not in self.draining]

    def replicas(self) -> list[ev.PipelineLoad]:
        """Every replica counted as capacity: serving or on its way (deploying), not draining, not failed."""
        pipelines = self.snapshot.pipelines if self.snapshot else []
        return [p for p in pipelines if p.state not in ("FAILED", "DEGRADED") and p.pipeline_id not in self.draining]
