"""Which pipeline (replica) serves a request: routing by model and load, with bounded admission."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.errors import FlexPipeError


class ModelNotFound(FlexPipeError):
    """No pipeline serves the requested model (HTTP 404)."""


class Overloaded(FlexPipeError):
    """Every replica of the model has its admission queue full (HTTP 429)."""


class NotReady(FlexPipeError):
    """The model is known but none of its replicas can take requests now (HTTP 503)."""


def model_name(model_dir: str | Path) -> str:
    """A pipeline's model as clients name it: its checkpoint directory's name."""
    return Path(model_dir).name


@dataclass(frozen=True, slots=True)
class Replica:
    """A pipeline as the router sees it: ``capacity`` requests may be admitted at once (running plus
    waiting); ``ready`` is False while its engine is not started or its pipeline is degraded."""

    pipeline_id: str
    model: str
    ready: bool
    capacity: int
    reason: str = ""


class ReplicaRouter:
    """Routes each request to the least-loaded ready replica of its model.

    A request names a model (served by every pipeline of that checkpoint) or one pipeline id. Load
    is the requests this gateway has admitted to a replica and not yet seen finish, relative to its
    capacity. Invariant: a replica never holds more than ``capacity`` admitted requests; every
    ``admit`` is matched by one ``release``. Not thread-safe: called from the HTTP event loop only.
    """

    def __init__(self, replicas: Callable[[], list[Replica]]) -> None:
        self.replicas = replicas
        self.admitted: dict[str, int] = {}

    def models(self) -> dict[str, list[Replica]]:
        by_model: dict[str, list[Replica]] = {}
        for replica in self.replicas():
            by_model.setdefault(replica.model, []).append(replica)
        return by_model

    def admit(self, model: str) -> Replica:
        """Choose a replica and count the request on it; raises ``ModelNotFound``, ``NotReady`` or
        ``Overloaded``."""
        known = self.replicas()
        candidates = [r for r in known if model in (r.model, r.pipeline_id)]
        if not candidates:
            served = sorted({r.model for r in known} | {r.pipeline_id for r in known})
            raise ModelNotFound(f"the model {model!r} does not exist; served: {served}")
        ready = [r for r in candidates if r.ready]
        if not ready:
            reasons = "; ".join(sorted({r.reason for r in candidates if r.reason}))
            raise NotReady(f"no replica of {model!r} can take requests now ({reasons}); try again shortly")
        open_ = [r for r in ready if self.admitted.get(r.pipeline_id, 0) < r.capacity]
        if not open_:
            raise Overloaded(f"every replica of {model!r} has its admission queue full; try again shortly")
        chosen = min(open_, key=lambda r: (self.admitted.get(r.pipeline_id, 0) / r.capacity, r.pipeline_id))
        self.admitted[chosen.pipeline_id] = self.admitted.get(chosen.pipeline_id, 0) + 1
        return chosen

    def release(self, replica: Replica) -> None:
        left = self.admitted.get(replica.pipeline_id, 0) - 1
        if left > 0:
            self.admitted[replica.pipeline_id] = left
        else:
            self.admitted.pop(replica.pipeline_id, None)

    def load(self, pipeline_id: str) -> int:
        return self.admitted.get(pipeline_id, 0)
