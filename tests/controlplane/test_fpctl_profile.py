"""``fpctl profile``: the data plane's measurement run as a child of the operator's CLI, its result shown."""

from __future__ import annotations

import json
import shutil

from cluster_support import fpctl

from common.profile import load_profile


def test_fpctl_profile_measures_stores_and_shows_the_profile(tmp_path, tiny_model):
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("flexpipe-profile.json"))
    env = {"FLEXPIPE_CONFIG": str(tmp_path / "none.toml"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    (tmp_path / "none.toml").write_text("")
    shown = json.loads(fpctl(env, "profile", "--model", str(model), "--stages", "1", "--batch", "2", "--json").stdout)
    stored = load_profile(model)
    assert stored is not None and shown["path"] == str(model / "flexpipe-profile.json")
    assert [c["num_stages"] for c in shown["profile"]["candidates"]] == [1] == [c.num_stages for c in stored.candidates]
    assert stored.candidates[0].throughput_tokens_per_s > 0
    text = fpctl(env, "profile", "--model", str(model), "--stages", "1", "--batch", "2").stdout
    assert "1 stages:" in text and "tokens/s" in text
    missing = fpctl(env, "profile", "--model", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
