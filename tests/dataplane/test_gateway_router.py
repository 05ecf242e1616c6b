"""Routing as a pure state machine: by model or pipeline id, to the least-loaded ready replica, with
bounded admission."""

from __future__ import annotations

import pytest

from dataplane.gateway.replicas import ModelNotFound, NotReady, Overloaded, Replica, ReplicaRouter


def router(*replicas: Replica) -> ReplicaRouter:
    return ReplicaRouter(lambda: list(replicas))


def test_requests_spread_over_the_replicas_of_a_model_by_load():
    r = router(Replica("p0", "m", True, 4), Replica("p1", "m", True, 4), Replica("q0", "other", True, 4))
    chosen = [r.admit("m").pipeline_id for _ in range(6)]
    assert sorted(chosen) == ["p0", "p0", "p0", "p1", "p1", "p1"]
    r.release(Replica("p1", "m", True, 4))
    assert r.admit("m").pipeline_id == "p1", "the replica with a free slot gets the next request"


def test_load_is_relative_to_capacity():
    r = router(Replica("small", "m", True, 2), Replica("big", "m", True, 8))
    chosen = [r.admit("m").pipeline_id for _ in range(10)]
    assert chosen.count("big") == 8 and chosen.count("small") == 2


def test_a_pipeline_id_pins_one_replica():
    r = router(Replica("p0", "m", True, 4), Replica("p1", "m", True, 4))
    assert {r.admit("p1").pipeline_id for _ in range(3)} == {"p1"}


def test_full_unknown_and_unready_models_are_told_apart():
    r = router(Replica("p0", "m", True, 1), Replica("d0", "down", False, 4, "pipeline d0 is degraded: worker-1 lost"))
    r.admit("m")
    with pytest.raises(Overloaded):
        r.admit("m")
    with pytest.raises(ModelNotFound, match="served: \\['d0', 'down', 'm', 'p0'\\]"):
        r.admit("gpt-4o")
    with pytest.raises(NotReady, match="degraded: worker-1 lost"):
        r.admit("down")


def test_every_admission_is_released_once():
    replica = Replica("p0", "m", True, 2)
    r = router(replica)
    r.admit("m"), r.admit("m")
    r.release(replica), r.release(replica), r.release(replica)
    assert r.load("p0") == 0
