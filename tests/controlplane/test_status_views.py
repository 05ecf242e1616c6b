"""fpctl's status tables read well in an 80-column terminal and in a pipe: one line per row."""

from __future__ import annotations

import io

from rich.console import Console

from common import events as ev
from controlplane.cli.views import pipelines_table, print_status, workers_table

GIB = 1 << 30


def realistic_status() -> ev.StatusReply:
    workers = []
    for i in range(12):
        stages = [
            ev.StageMetrics(
                pipeline_id="chat-prod",
                epoch=3,
                stage=i % 4,
                queue_length=17,
                busy_fraction=0.87,
                kv_blocks_used=1200,
                kv_blocks_free=52000,
                tokens_per_s=4000.0,
            )
        ]
        device = ev.DeviceInfo(
            device_id=f"gpu{i}",
            kind="cuda",
            name="NVIDIA H200",
            memory_total=141 * GIB,
            memory_free=57 * GIB,
            host="gpu-node-017.cluster",
        )
        workers.append(
            ev.WorkerView(
                worker_id=f"worker-{i}",
                state="alive" if i != 5 else "lost",
                host="gpu-node-017.cluster",
                pid=412000 + i,
                device=device,
                last_heartbeat_age_s=0.4,
                stages=stages if i < 8 else [],
            )
        )
    stages = [
        ev.StageView(
            stage=k,
            worker_id=f"worker-{k}",
            units=[f"L{8 * k}.attn", f"L{8 * k + 7}.mlp"],
            queue_length=17,
            busy_fraction=0.5,
            kv_blocks_used=1200,
            kv_blocks_free=52000,
        )
        for k in range(4)
    ]
    pipeline = ev.PipelineView(
        pipeline_id="chat-prod",
        state="DEGRADED",
        epoch=3,
        model_dir="/var/lib/flexpipe/models/SmolLM2-135M-Instruct",
        engine_host="engine-0",
        stages=stages,
        reason="worker worker-5 was lost: exited with code -9",
    )
    host = ev.EngineHostView(host_id="engine-0", state="alive", pid=411999, request_address="tcp://10.0.3.17:7701")
    model = ev.ModelPolicyView(
        model_dir=pipeline.model_dir,
        stages=[4, 2],
        replicas=2,
        target_stages=4,
        target_replicas=3,
        arrival_rate=12.5,
        cv=3.75,
        trend=-0.125,
        cooldown_left_s=12.0,
        in_flight="split chat-prod-r1 2 -> 4 stages",
    )
    policy = ev.PolicyView(mode="flexpipe", paused=False, models=[model], decisions=17)
    return ev.StatusReply(
        sender="controller",
        reply_to=1,
        workers=workers,
        engine_hosts=[host],
        pipelines=[pipeline],
        rejected_messages=3,
        policy=policy,
    )


def render(draw, width: int) -> list[str]:
    out = io.StringIO()
    draw(Console(file=out, width=width, color_system=None))
    return out.getvalue().splitlines()


def test_the_default_tables_fit_80_columns_with_one_line_per_row():
    status = realistic_status()
    lines = render(lambda console: print_status(console, status), 80)
    assert max(map(len, lines)) <= 80
    for worker in status.workers:
        (row,) = [line for line in lines if f" {worker.worker_id} " in line and worker.device.name in line]
        assert worker.state in row and "57.0 GiB" in row
        assert ("chat-prod#" in row) == bool(worker.stages)
    for stage in status.pipelines[0].stages:
        (row,) = [line for line in lines if f"L{8 * stage.stage}.attn..L{8 * stage.stage + 7}.mlp" in line]
        assert stage.worker_id in row and " 17 " in row
    assert any("worker worker-5 was lost: exited with code -9" in line for line in lines), "the reason is shown"
    assert any("tcp://10.0.3.17:7701" in line for line in lines), "the engine host's address is shown"
    (row,) = [line for line in lines if "SmolLM2-135M-Instruct" in line]
    assert "4,2" in row and "4x3" in row and "12.50" in row and "3.75" in row
    assert any("policy (flexpipe, 17 decisions)" in line for line in lines)


def test_wide_tables_show_every_column_on_one_line_per_row():
    status = realistic_status()
    workers = render(lambda console: console.print(workers_table(status, wide=True)), 200)
    (row,) = [line for line in workers if " worker-3 " in line]
    for cell in ("412003", "gpu-node-017.cluster", "57.0 GiB / 141.0 GiB", "0.4s", "q=17 busy=87%"):
        assert cell in row
    pipelines = render(lambda console: console.print(pipelines_table(status, wide=True)), 200)
    (row,) = [line for line in pipelines if "L0.attn..L7.mlp" in line]
    assert "50%" in row and "1200/52000" in row and "exited with code -9" in row
    policy = render(lambda console: print_status(console, status, wide=True), 200)
    (row,) = [line for line in policy if "SmolLM2-135M-Instruct" in line and "4x3" in line]
    assert "-0.125" in row and "12s" in row and "split chat-prod-r1 2 -> 4 stages" in row
