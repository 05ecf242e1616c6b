"""An actor in its own process: the allocator runs alone and the controller reaches it by configuration only."""

import os
import subprocess
import sys

from bus_support import REPO, ControllerProcess

from common import events as ev
from controlplane.client import BusClient


def test_deploy_places_stages_through_an_allocator_in_another_process(tmp_path, tiny_model):
    runtime = f"/tmp/fpa-{os.getpid()}"
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    allocator_endpoint = f"ipc://{runtime}/allocator.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO), FLEXPIPE_LOG_FORMAT="json")
    allocator = subprocess.Popen(
        [sys.executable, "-m", "controlplane.actor_host", "--actor", "allocator", "--endpoint", allocator_endpoint],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "allocator.log", "wb"),
    )
    controller = None
    try:
        controller = ControllerProcess(
            tmp_path,
            {"FLEXPIPE_CONTROLLER_ALLOCATOR": allocator_endpoint, "FLEXPIPE_CONTROLLER_HEARTBEAT_INTERVAL_S": "30"},
        )
        members = []
        for i in range(2):
            worker = BusClient(controller.ipc, sender=f"w{i}")
            device = ev.DeviceInfo(
                device_id=f"w{i}", kind="cpu", name="virtual", memory_total=1 << 30, memory_free=1 << 30, host="h1"
            )
            worker.request(ev.RegisterWorker, worker_id=f"w{i}", host="h1", pid=1000 + i, device=device)
            members.append(worker)
        engine = BusClient(controller.ipc, sender="e0")
        engine.request(ev.RegisterEngineHost, host_id="e0", host="h1", pid=999, request_address="ipc://unused")
        members.append(engine)
        with BusClient(controller.ipc) as operator:
            operator.request(ev.DeployPipeline, pipeline_id="p1", model_dir=str(tiny_model), num_stages=2)
        prepare = engine.receive(20.0)
        assert isinstance(prepare, ev.PrepareEngine) and prepare.pipeline_id == "p1", prepare
        with BusClient(controller.ipc) as operator:
            (pipeline,) = operator.request(ev.StatusRequest).pipelines
        assert pipeline.state == "PREPARING"
        assert sorted(stage.worker_id for stage in pipeline.stages) == ["w0", "w1"], "placed by the remote allocator"
        for member in members:
            member.close()
    finally:
        if controller is not None:
            controller.stop()
        allocator.terminate()
        allocator.wait(10)
        for name in os.listdir(runtime):
            os.unlink(os.path.join(runtime, name))
        os.rmdir(runtime)
    assert allocator.returncode is not None


def test_a_standalone_allocator_accepts_every_event_the_controller_tells_it(tmp_path):
    import msgspec
    from wire_samples import sample_struct

    from common.config import FlexPipeConfig, with_overrides
    from controlplane.allocator import Allocator
    from controlplane.controller import build_actors

    told = {ev.RegisterWorker, ev.WorkerLost, ev.PlaceStages, ev.ReleasePlacement, ev.PipelineReshaped, ev.RefactorHold}
    assert told == set(Allocator.accepts), "the events the monitor, deploy coordinator and refactor executor tell it"
    alone = with_overrides(FlexPipeConfig(), controller={"allocator": "ipc://elsewhere"})
    assert "allocator" not in {a.name for a in build_actors(alone)}
    runtime = f"/tmp/fpb-{os.getpid()}"
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    endpoint = f"ipc://{runtime}/allocator.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO), FLEXPIPE_LOG_FORMAT="json")
    allocator = subprocess.Popen(
        [sys.executable, "-m", "controlplane.actor_host", "--actor", "allocator", "--endpoint", endpoint],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "allocator.log", "wb"),
    )
    try:
        with BusClient(endpoint, sender="controller", timeout_s=20) as bus:
            for kind in sorted(told - {ev.PlaceStages}, key=lambda k: k.__name__):
                bus.send(msgspec.structs.replace(sample_struct(kind), sender="controller"))
            placed = bus.request(ev.PlaceStages, pipeline_id="p9", stage_memory=[1])
        assert isinstance(placed, ev.PlacementDecided) and placed.pipeline_id == "p9"
        assert not [e for e in bus.unsolicited if isinstance(e, ev.ErrorReply)], bus.unsolicited
    finally:
        allocator.terminate()
        allocator.wait(10)
        for name in os.listdir(runtime):
            os.unlink(os.path.join(runtime, name))
        os.rmdir(runtime)
