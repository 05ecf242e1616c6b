"""``fpctl plan --trace``: the Azure conversation trace replayed through the policy in virtual time, no cluster."""

from __future__ import annotations

import json
from pathlib import Path

from cluster_support import fpctl

TRACE = Path(__file__).resolve().parents[1] / "data" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"


def plan(env, model: Path, *args: str) -> dict:
    out = fpctl(env, "plan", "--trace", str(TRACE), "--model", str(model), "--limit-requests", "2000", *args, "--json")
    return json.loads(out.stdout)


def test_the_decisions_differ_between_cv_1_and_cv_4_and_each_is_explained(tmp_path, default_model):
    env = {"FLEXPIPE_CONFIG": str(tmp_path / "none.toml"), "PATH": "/usr/bin:/bin"}
    (tmp_path / "none.toml").write_text("")
    steady, bursty = (plan(env, default_model, "--cv", cv, "--workers", "4") for cv in ("1", "4"))
    sequences = [[(d["kind"], d["action"]) for d in result["decisions"]] for result in (steady, bursty)]
    assert sequences[0] and sequences[1] and sequences[0] != sequences[1]
    assert max(d["stages_to"] for d in bursty["decisions"]) > max(d["stages_to"] for d in steady["decisions"])
    for decision in steady["decisions"] + bursty["decisions"]:
        assert decision["arrival_rate"] > 0 and decision["queues"], decision
        assert [c["num_stages"] for c in decision["candidates"]] == [1, 2, 3, 4]
        assert all(c["score"] >= 0 and c["throughput"] > 0 for c in decision["candidates"])
        assert decision["layout"]["replicas"], decision
        for replica in decision["layout"]["replicas"].values():
            assert len(set(replica["devices"])) == len(replica["devices"]) == replica["stages"]


def test_a_bad_trace_is_refused_with_its_line(tmp_path, default_model):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,12,x\n")
    env = {"FLEXPIPE_CONFIG": str(tmp_path / "none.toml"), "PATH": "/usr/bin:/bin"}
    (tmp_path / "none.toml").write_text("")
    result = fpctl(env, "plan", "--trace", str(bad), "--model", str(default_model), check=False)
    assert result.returncode == 1 and f"{bad}:2" in result.stderr and "Traceback" not in result.stderr
    missing = fpctl(env, "plan", check=False)
    assert missing.returncode == 1 and "--trace" in missing.stderr
