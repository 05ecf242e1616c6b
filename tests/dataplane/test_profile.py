"""``python -m dataplane.profile``: a model's throughput and latency per stage count, measured on a tiny random
checkpoint, stored with ``common.profile``, reused unless forced, and no worker process left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import psutil
import pytest

from common.model.spec import ModelSpec
from common.profile import GranularityProfile, ModelProfile, config_sha256, load_profile, profile_path, save_profile
from dataplane.profile import Workload, measure_profile
from dataplane.profile.__main__ import main as profile_main
from dataplane.profile.device import device_description
from dataplane.profile.reuse import covers

REPO = Path(__file__).resolve().parents[2]
SHAPE = ["--batch", "2", "--prompt-tokens", "8", "--output-tokens", "4"]
WORKLOAD = Workload(batch_size=2, prompt_tokens=8, output_tokens=4)
TAG = "FLEXPIPE_PROFILE_TEST_TAG"  # marks the processes a command of this module started, workers included
SENTINEL_TOKENS_PER_S = 12345.0  # a throughput no measurement of the tiny model gives


def copy_model(source: Path, target: Path) -> Path:
    """A private copy of a checkpoint, so that profiles written beside it and config edits stay in this test."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("flexpipe-profile.json"))
    return target


def run_profile(*args: str, tag: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env[TAG] = tag or uuid.uuid4().hex
    return subprocess.run(
        [sys.executable, "-m", "dataplane.profile", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env=env,
    )


def processes_tagged(tag: str) -> list[psutil.Process]:
    """Live processes (of any parent) whose environment carries ``TAG=tag``."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG) == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            pass
    return found


def own_stage_workers() -> list[psutil.Process]:
    workers = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "dataplane.worker" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:
            pass
    return workers


def sentinel_profile(model_dir: Path, stages: list[int]) -> ModelProfile:
    """A profile that ``covers`` ``WORKLOAD`` at ``stages`` on this host, with values no measurement gives."""
    return ModelProfile(
        model=model_dir.name,
        config_sha256=config_sha256(model_dir),
        device=device_description("shm"),
        measured_at="2000-01-01T00:00:00+00:00",
        prompt_tokens=WORKLOAD.prompt_tokens,
        output_tokens=WORKLOAD.output_tokens,
        candidates=[
            GranularityProfile(
                num_stages=k, batch_size=WORKLOAD.batch_size, throughput_tokens_per_s=SENTINEL_TOKENS_PER_S, latency_s=1
            )
            for k in stages
        ],
    )


@pytest.fixture(scope="module")
def measured(checkpoint, tmp_path_factory):
    """One real run of the command at stages 1,2 on a private copy of a 3-layer tiny Llama: (model dir, run, tag)."""
    model_dir = copy_model(checkpoint("llama"), tmp_path_factory.mktemp("profiled") / "tiny-llama")
    tag = uuid.uuid4().hex
    return model_dir, run_profile(model_dir, "--stages", "1,2", *SHAPE, tag=tag), tag


def test_the_command_writes_a_profile_with_one_candidate_per_stage_count(measured):
    model_dir, result, _ = measured
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == profile_path(model_dir) == model_dir / "flexpipe-profile.json"
    profile = load_profile(model_dir)
    assert profile is not None and profile == msgspec.json.decode(path.read_bytes(), type=ModelProfile)
    assert profile.model == model_dir.name and profile.config_sha256 == config_sha256(model_dir)
    assert profile.device == device_description("shm") and profile.device.startswith("cpu: ")
    assert (profile.prompt_tokens, profile.output_tokens) == (8, 4)
    assert [c.num_stages for c in profile.candidates] == [1, 2]
    for candidate in profile.candidates:
        assert candidate.batch_size == 2
        assert candidate.throughput_tokens_per_s > 0 and candidate.latency_s > 0
        assert candidate.ttft_s > 0 and candidate.step_s > 0
    assert "Profiling" in result.stderr and "Traceback" not in result.stderr


def test_the_command_leaves_no_process_behind(measured):
    *_, tag = measured
    leftovers = psutil.wait_procs(processes_tagged(tag), timeout=10)[1]
    for process in leftovers:
        process.kill()
    assert not leftovers, f"processes of the profile command left running: {[p.pid for p in leftovers]}"


def test_a_changed_config_invalidates_the_profile(measured, tmp_path):
    model_dir = copy_model(measured[0], tmp_path / "edited")
    shutil.copy(measured[0] / "flexpipe-profile.json", model_dir / "flexpipe-profile.json")
    assert load_profile(model_dir) is not None
    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (model_dir / "config.json").write_text(json.dumps(config))
    assert load_profile(model_dir) is None


def test_a_stored_profile_that_covers_the_request_is_reused(checkpoint, tmp_path):
    model_dir = copy_model(checkpoint("llama"), tmp_path / "tiny-llama")
    path = save_profile(sentinel_profile(model_dir, [1, 2, 3]), model_dir)
    stored, mtime = path.read_bytes(), path.stat().st_mtime_ns
    result = run_profile(model_dir, "--stages", "2,1", *SHAPE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(path)
    assert "reusing" in result.stderr and "Profiling" not in result.stderr
    assert path.read_bytes() == stored and path.stat().st_mtime_ns == mtime


def test_force_measures_again(checkpoint, tmp_path):
    model_dir = copy_model(checkpoint("llama"), tmp_path / "tiny-llama")
    path = save_profile(sentinel_profile(model_dir, [1]), model_dir)
    tag = uuid.uuid4().hex
    result = run_profile(model_dir, "--stages", "1", *SHAPE, "--force", tag=tag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(path) and "reusing" not in result.stderr
    profile = load_profile(model_dir)
    assert [c.num_stages for c in profile.candidates] == [1]
    assert profile.measured_at > "2000-01-01" and profile.candidates[0].throughput_tokens_per_s != SENTINEL_TOKENS_PER_S
    assert not psutil.wait_procs(processes_tagged(tag), timeout=10)[1]


def test_reuse_needs_the_same_shape_device_and_stage_counts(checkpoint):
    profile = sentinel_profile(checkpoint("llama"), [1, 2])
    device = profile.device
    assert covers(profile, [1, 2], WORKLOAD, device) and covers(profile, [2], WORKLOAD, device)
    assert not covers(profile, [3], WORKLOAD, device)
    assert not covers(profile, [1], Workload(4, 8, 4), device)
    assert not covers(profile, [1], Workload(2, 16, 4), device)
    assert not covers(profile, [1], Workload(2, 8, 8), device)
    assert not covers(profile, [1], WORKLOAD, "NVIDIA H200")


@pytest.mark.parametrize("directory, message", [("missing", "does not exist"), ("empty", "no config.json")])
def test_a_bad_model_dir_exits_with_one_clear_line(tmp_path, directory, message):
    (tmp_path / "empty").mkdir()
    result = run_profile(tmp_path / directory)
    assert result.returncode == 1
    assert result.stdout == "" and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--stages", "4"], "between 1 and the model's 3 layers"),
        (["--output-tokens", "1"], "output tokens must be at least 2"),
        (["--prompt-tokens", "600"], "exceed the model's context"),
    ],
)
def test_a_bad_request_exits_with_one_clear_line(checkpoint, capsys, arguments, message):
    assert profile_main([str(checkpoint("llama")), *arguments]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_measure_profile_is_importable_reports_progress_and_stops_its_workers(checkpoint):
    heard = []
    profile = measure_profile(checkpoint("llama"), [1], 2, 8, 4, progress=lambda k, result: heard.append((k, result)))
    assert [c.num_stages for c in profile.candidates] == [1]
    assert heard == [(1, None), (1, profile.candidates[0])]
    assert profile.device == device_description("shm") and profile.model == checkpoint("llama").name
    assert ModelSpec.from_dir(checkpoint("llama")).num_layers == 3
    assert not psutil.wait_procs(own_stage_workers(), timeout=10)[1]
