"""fpctl: the operator's command line, a peer on the control bus like any other.

fpctl up [--workers N]          start a local cluster (controller, workers, engine host)
fpctl down                      stop it
fpctl status | workers | pipelines [--json]
fpctl deploy [--model DIR] (--stages N | --layout A..B,C..D) [--pipeline ID]
fpctl undeploy PIPELINE
fpctl generate --pipeline P --prompt TEXT --max-tokens N
fpctl keys init [--force]
fpctl timeline [--log FILE] [--pipeline ID] [--json]   refactors rebuilt from a JSON log; no cluster needed
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from common import events as ev
from common.config import load_config
from common.errors import FlexPipeError
from common.runtime import runtime_dir
from controlplane.cli.timeline import build_timelines, read_refactor_events
from controlplane.cli.timeline_views import print_timelines
from controlplane.cli.views import pipelines_table, print_refactor_outcome, print_status, to_json, workers_table
from controlplane.client import BusClient, BusError, wait_for_pipeline
from controlplane.supervisor import STOP_TIMEOUT_S, child_environment, cluster_state_path


def default_model_dir() -> str:
    """The embedded default model's directory, written on first use by the data plane's own command
    (run as a child process: the control plane never imports torch)."""
    result = subprocess.run(
        [sys.executable, "-m", "dataplane.models.tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_environment(),
    )
    if result.returncode != 0:
        raise FlexPipeError(f"could not write the default model: {result.stderr.strip()[-500:]}")
    return result.stdout.strip().splitlines()[-1]


class Fpctl:
    """One fpctl invocation. Invariant: every process it starts is either left running as the
    cluster (recorded in the state file) or stopped before it returns."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = load_config(args.config)
        self.console = Console()
        self.endpoint = args.endpoint or self.config.controller.ipc_endpoint

    def bus(self) -> BusClient:
        return BusClient(
            self.endpoint,
            sender=f"fpctl-{os.getpid()}",
            key_dir=self.config.security.key_path,
            insecure=self.args.insecure or self.config.security.insecure,
            timeout_s=self.args.timeout,
        )

    def status(self) -> ev.StatusReply:
        with self.bus() as bus:
            return bus.request(ev.StatusRequest)

    # ---- cluster lifecycle ------------------------------------------------------------------

    def up(self) -> int:
        state = cluster_state_path()
        if state.exists() and _pid_alive(json.loads(state.read_text()).get("pid", -1)):
            raise FlexPipeError(
                f"a cluster is already up (supervisor pid {json.loads(state.read_text())['pid']}); "
                "run `fpctl down` first"
            )
        log_path = runtime_dir() / "cluster.log"
        argv = [sys.executable, "-m", "controlplane.supervisor"]
        argv += ["--workers", str(self.args.workers)] if self.args.workers else []
        argv += ["--config", self.args.config] if self.args.config else []
        argv += ["--insecure"] if self.args.insecure else []
        env = dict(os.environ, FLEXPIPE_LOG_FORMAT=os.environ.get("FLEXPIPE_LOG_FORMAT", "json"))
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
        )
        with open(log_path, "ab") as log:
            supervisor = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
            )
        deadline = time.monotonic() + self.config.cluster.ready_timeout_s + 30
        while time.monotonic() < deadline:
            if supervisor.poll() is not None:
                raise FlexPipeError(
                    f"the cluster failed to start (exit {supervisor.returncode}); last log lines:\n{_tail(log_path)}"
                )
            if state.exists() and json.loads(state.read_text() or "{}").get("pid") == supervisor.pid:
                status = self.status()
                if self.args.json:
                    print(to_json({"supervisor_pid": supervisor.pid, "log": str(log_path), "status": status}))
                else:
                    self.console.print(f"cluster up (supervisor pid {supervisor.pid}, log {log_path})")
                    print_status(self.console, status)
                return 0
            time.sleep(0.2)
        _stop_pid(supervisor.pid)
        raise FlexPipeError(f"the cluster was not ready in time; last log lines:\n{_tail(log_path)}")

    def down(self) -> int:
        state = cluster_state_path()
        if not state.exists():
            self.console.print("no cluster is up")
            return 0
        pid = json.loads(state.read_text()).get("pid", -1)
        stopped = _stop_pid(pid)
        state.unlink(missing_ok=True)
        self.console.print(f"cluster down (supervisor pid {pid}{'' if stopped else ', was already gone'})")
        return 0

    # ---- reads ------------------------------------------------------------------------------

    def show(self, what: str) -> int:
        status = self.status()
        if self.args.json:
            payload = {"status": status, "workers": status.workers, "pipelines": status.pipelines}[what]
            print(to_json(payload))
        elif what == "workers":
            self.console.print(workers_table(status, self.args.wide))
        elif what == "pipelines":
            self.console.print(pipelines_table(status, self.args.wide))
        else:
            print_status(self.console, status, self.args.wide)
        return 0

    # ---- pipelines --------------------------------------------------------------------------

    def deploy(self) -> int:
        model = self.args.model
        if model is None:
            model = default_model_dir()
        layout = [part.strip() for part in self.args.layout.split(",")] if self.args.layout else []
        pipeline_id = self.args.pipeline or f"p{int(time.time()) % 100000}"
        with self.bus() as bus:
            bus.request(
                ev.DeployPipeline,
                pipeline_id=pipeline_id,
                model_dir=str(Path(model).resolve()),
                num_stages=self.args.stages or 0,
                layout=layout,
                transport=self.args.transport,
            )
        view = self._wait_for(pipeline_id, ("READY", "FAILED"), self.args.wait_timeout)
        if self.args.json:
            print(to_json(view))
        else:
            self.console.print(f"pipeline {pipeline_id}: {view.state}{' - ' + view.reason if view.reason else ''}")
        return 0 if view.state == "READY" else 1

    def _wait_for(self, pipeline_id: str, states: tuple[str, ...], timeout_s: float) -> ev.PipelineView:
        with self.bus() as bus:
            return wait_for_pipeline(bus, pipeline_id, states, timeout_s)

    def undeploy(self) -> int:
        with self.bus() as bus:
            bus.request(ev.UndeployPipeline, pipeline_id=self.args.pipeline_id)
        self.console.print(f"pipeline {self.args.pipeline_id} undeployed")
        return 0

    def generate(self) -> int:
        status = self.status()
        view = next((p for p in status.pipelines if p.pipeline_id == self.args.pipeline), None)
        if view is None:
            raise FlexPipeError(
                f"no pipeline {self.args.pipeline!r}; deployed: {[p.pipeline_id for p in status.pipelines]}"
            )
        host = next((h for h in status.engine_hosts if h.host_id == view.engine_host), None)
        if host is None:
            raise FlexPipeError(f"engine host {view.engine_host!r} of pipeline {view.pipeline_id} is not registered")
        token_ids: list[int] = []
        with BusClient(
            host.request_address,
            sender=f"fpctl-{os.getpid()}",
            key_dir=self.config.security.key_path,
            insecure=self.args.insecure or self.config.security.insecure,
            timeout_s=self.args.timeout,
        ) as client:
            request = client.command(
                ev.GenerateRequest,
                pipeline_id=view.pipeline_id,
                prompt=self.args.prompt,
                max_tokens=self.args.max_tokens,
                temperature=self.args.temperature,
                seed=self.args.seed,
                ignore_eos=self.args.ignore_eos,
            )
            try:
                client.send(request)
            except (OverflowError, TypeError, ValueError) as exc:  # msgpack cannot carry the value
                raise FlexPipeError(f"request_refused: a value cannot be sent: {exc}") from None
            try:
                while True:
                    chunk = client.await_reply(request.cmd_id, self.args.timeout)
                    token_ids += chunk.token_ids
                    if not self.args.json and not chunk.finish_reason:
                        print(" ".join(map(str, chunk.token_ids)), end=" ", flush=True)
                    if chunk.finish_reason:
                        break
            except BaseException:  # timed out or interrupted: the engine stops decoding for nobody
                client.send_last(client.command(ev.CancelGenerate, request_id=request.cmd_id))
                raise
        result = {
            "pipeline": view.pipeline_id,
            "token_ids": token_ids,
            "text": chunk.text,
            "finish_reason": chunk.finish_reason,
            "usage": {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens},
        }
        if self.args.json:
            print(json.dumps(result))
        else:
            print(" ".join(map(str, chunk.token_ids)))
            self.console.print(
                f"[bold]text[/bold]: {chunk.text!r}  ({chunk.finish_reason}, {chunk.completion_tokens} tokens)"
            )
        return 0

    def plan(self) -> int:
        """``fpctl plan``: what a refactor would move, and the estimated bytes and stall, doing nothing."""
        return self._refactor(dry_run=True)

    def refactor(self) -> int:
        return self._refactor(dry_run=False)

    def _refactor(self, dry_run: bool) -> int:
        layout = [part.strip() for part in self.args.layout.split(",")] if self.args.layout else None
        migrate = [int(s) for s in self.args.migrate.split(",")] if self.args.migrate else []
        with self.bus() as bus:
            outcome = bus.request(
                ev.RefactorPipeline,
                timeout_s=self.args.wait_timeout,
                pipeline_id=self.args.pipeline_id,
                num_stages=self.args.stages,
                layout=layout,
                migrate=migrate,
                dry_run=dry_run,
                by="fpctl",
            )
        if self.args.json:
            print(to_json(outcome))
        else:
            print_refactor_outcome(self.console, outcome)
        return 0 if outcome.outcome in ("planned", "committed") else 1

    def keys_init(self) -> int:
        from controlplane import security

        key_dir = Path(self.args.dir) if self.args.dir else self.config.security.key_path
        paths = security.init_keys(key_dir, force=self.args.force)
        self.console.print(f"CURVE keys written to {key_dir}")
        if self.args.json:
            print(
                to_json(
                    {"key_dir": str(key_dir), "paths": {k: str(v) for k, v in vars(paths).items()}}
                    if hasattr(paths, "__dict__")
                    else {"key_dir": str(key_dir)}
                )
            )
        return 0


def timeline(args: argparse.Namespace) -> int:
    """``fpctl timeline``: reads a log, not the cluster; exit 2 when the log cannot be read."""
    try:
        events = _refactor_events(args.log)
    except OSError as exc:
        print(f"fpctl: cannot read log {args.log}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    timelines = [t for t in build_timelines(events) if args.pipeline in (None, t.pipeline_id)]
    if args.json:
        print(json.dumps([t.to_dict() for t in timelines], indent=2))
    else:
        print_timelines(Console(), timelines)
    return 0


def _refactor_events(path: str | None) -> list[dict]:
    if path in (None, "-"):
        buffer = getattr(sys.stdin, "buffer", None)  # absent when a caller swapped in a text stream
        return read_refactor_events(sys.stdin if buffer is None else io.TextIOWrapper(buffer, "utf-8", "replace"))
    with open(path, encoding="utf-8", errors="replace") as lines:
        return read_refactor_events(lines)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop_pid(pid: int) -> bool:
    """SIGTERM ``pid`` and wait for it (SIGKILL after the stop timeout); False if it was not running."""
    if pid <= 0 or not _pid_alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if _pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
        _reap(pid)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fpctl", description="Operate a FlexPipe cluster.")
    p.add_argument(
        "--config", help="FlexPipe TOML configuration (default: $FLEXPIPE_CONFIG or ~/.config/flexpipe/flexpipe.toml)"
    )
    p.add_argument("--endpoint", help="controller endpoint (default: the configuration's ipc endpoint)")
    p.add_argument("--insecure", action="store_true", help="plain TCP to a loopback endpoint, without CURVE")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a local cluster")
    up.add_argument("--workers", type=int, help="number of workers (default: from the configuration)")
    sub.add_parser("down", help="stop the local cluster")
    for name in ("status", "workers", "pipelines"):
        shown = sub.add_parser(name, help=f"show {name}")
        shown.add_argument("--wide", action="store_true", help="every column (default: what fits 80 columns)")
    deploy = sub.add_parser("deploy", help="deploy a model as a pipeline")
    deploy.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    deploy.add_argument("--stages", type=int, help="number of stages (the partitioner cuts)")
    deploy.add_argument("--layout", help="explicit unit ranges, e.g. embed..L1.mlp,L2.attn..head")
    deploy.add_argument("--pipeline", help="pipeline id (default: generated)")
    deploy.add_argument("--transport", default="shm", help="data-plane transport (default: %(default)s)")
    deploy.add_argument("--wait-timeout", type=float, default=120.0, help="seconds to wait for READY")
    undeploy = sub.add_parser("undeploy", help="remove a pipeline")
    undeploy.add_argument("pipeline_id")
    generate = sub.add_parser("generate", help="send one request through a pipeline and stream the tokens")
    generate.add_argument("--pipeline", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=16)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--ignore-eos", action="store_true")
    for name, help_text in (
        ("plan", "show what a refactor would move, the bytes and the estimated stall"),
        ("refactor", "re-shape a serving pipeline in flight"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("pipeline_id")
        command.add_argument("--stages", type=int, help="target number of stages")
        command.add_argument("--layout", help="target unit ranges, e.g. embed..L1.attn,L1.mlp..head")
        command.add_argument("--migrate", help="stage indices to move to other workers, e.g. 1 or 0,2")
        command.add_argument("--wait-timeout", type=float, default=300.0, help="seconds to wait for the outcome")
    keys = sub.add_parser("keys", help="CURVE key management")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create the key directory and key pairs")
    init.add_argument("--dir", help="key directory (default: from the configuration)")
    init.add_argument("--force", action="store_true", help="replace existing keys")
    timeline_cmd = sub.add_parser("timeline", help="rebuild refactor timelines from a JSON log (no cluster needed)")
    timeline_cmd.add_argument(
        "--log", metavar="FILE", help="JSON log, e.g. <runtime dir>/cluster.log (default, or -: standard input)"
    )
    timeline_cmd.add_argument("--pipeline", metavar="ID", help="only this pipeline's refactors")
    for command in sub.choices.values():
        command.add_argument("--json", action="store_true", help="machine-readable output")
    init.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "timeline":
        return timeline(args)
    try:
        fpctl = Fpctl(args)
        if args.command in ("status", "workers", "pipelines"):
            return fpctl.show(args.command)
        if args.command == "keys":
            return fpctl.keys_init()
        return getattr(fpctl, args.command)()
    except (FlexPipeError, BusError) as exc:
        print(f"fpctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fpctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
