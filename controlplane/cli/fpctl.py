"""fpctl: the operator's command line, a peer on the control bus like any other.

fpctl up [--workers N] [--host H] [--port P] [--stages N [--model DIR]]
                                start a local cluster (controller, workers, gateway) and deploy
fpctl down                      stop it
fpctl status | workers | pipelines [--json]
fpctl deploy [--model DIR] (--stages N | --layout A..B,C..D) [--pipeline ID]
fpctl undeploy PIPELINE
fpctl generate [--model M] --prompt TEXT [--max-tokens N]   through the gateway's OpenAI API
fpctl chat [--model M] [--system TEXT] [--message TEXT]      a conversation through the gateway
fpctl keys init [--force]
fpctl timeline [--log FILE] [--pipeline ID] [--json]   refactors rebuilt from a JSON log; no cluster needed
fpctl events [--follow] [--json]                       the policy's decisions, each with its inputs
fpctl policy pause|resume                              stop or restart automatic changes
fpctl plan --trace FILE [--cv X] [--inventory FILE]    replay a request trace through the policy, no cluster
fpctl profile [--model DIR] [--stages 1,2,4]           measure throughput and latency per stage count
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import msgspec
from rich.console import Console

from common import events as ev
from common.config import load_config
from common.errors import FlexPipeError
from common.profile import load_profile
from common.runtime import runtime_dir
from controlplane.cli.gateway_client import GatewayClient
from controlplane.cli.policy_views import decision_line, print_decisions
from controlplane.cli.timeline import build_timelines, read_refactor_events
from controlplane.cli.timeline_views import print_timelines
from controlplane.cli.views import pipelines_table, print_refactor_outcome, print_status, to_json, workers_table
from controlplane.client import BusClient, BusError, wait_for_pipeline
from controlplane.supervisor import STOP_TIMEOUT_S, child_environment, cluster_state_path


def default_model_dir() -> str:
    """The directory of the embedded default model, SmolLM2-135M-Instruct, converted into the model cache on first
    use (about 40 s on 2 cores) by the data plane's own command, run as a child process: the control plane never
    imports torch. The child's progress bar and errors go straight to this process's stderr; its last stdout line
    is the directory. Raises FlexPipeError when the child fails or runs past 10 minutes."""
    command = [sys.executable, "-m", "dataplane.models.default_model"]
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=600, env=child_environment())
    except subprocess.TimeoutExpired:
        raise FlexPipeError("preparing the default model SmolLM2-135M-Instruct took over 600 s; stopped") from None
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise FlexPipeError(
            f"could not prepare the default model SmolLM2-135M-Instruct: python {' '.join(command[1:])} exited with "
            f"{result.returncode} (its error is printed above); pass --model DIR to deploy another checkpoint"
        )
    return lines[-1]


class Fpctl:
    """One fpctl invocation. Invariant: every process it starts is either left running as the
    cluster (recorded in the state file) or stopped before it returns."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = load_config(args.config)
        self.console = Console()
        self.endpoint = args.endpoint or self.config.controller.ipc_endpoint

    def bus(self) -> BusClient:
        if self.endpoint.startswith("ipc://") and not Path(self.endpoint[len("ipc://") :]).exists():
            raise FlexPipeError(f"no controller listens at {self.endpoint}; is the cluster up (`fpctl up`)?")
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
        if self.args.host is not None:
            env["FLEXPIPE_GATEWAY_HOST"] = self.args.host
        if self.args.port is not None:
            env["FLEXPIPE_GATEWAY_PORT"] = str(self.args.port)
        if self.args.policy is not None:
            env["FLEXPIPE_POLICY_MODE"] = self.args.policy
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
                return self._serve_after_up(supervisor.pid, log_path)
            time.sleep(0.2)
        _stop_pid(supervisor.pid)
        raise FlexPipeError(f"the cluster was not ready in time; last log lines:\n{_tail(log_path)}")

    def _serve_after_up(self, supervisor_pid: int, log_path: Path) -> int:
        """Deploy what ``up`` was asked to serve (``--stages``/``--model``), then show the cluster."""
        deployed = None
        if self.args.stages or self.args.model:
            deployed = self._deploy(self.args.model, self.args.stages or 1, [], self.args.pipeline or "p0", "shm")
        status = self.status()
        if self.args.json:
            print(to_json({"supervisor_pid": supervisor_pid, "log": str(log_path), "status": status}))
        else:
            self.console.print(f"cluster up (supervisor pid {supervisor_pid}, log {log_path})")
            print_status(self.console, status)
            if deployed is not None:
                self.console.print(
                    f"pipeline {deployed.pipeline_id}: {deployed.state}"
                    f"{' - ' + deployed.reason if deployed.reason else ''}; model "
                    f"{Path(deployed.model_dir).name!r}"
                )
        return 0 if deployed is None or deployed.state == "READY" else 1

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
        layout = [part.strip() for part in self.args.layout.split(",")] if self.args.layout else []
        pipeline_id = self.args.pipeline or f"p{int(time.time()) % 100000}"
        view = self._deploy(self.args.model, self.args.stages or 0, layout, pipeline_id, self.args.transport)
        if self.args.json:
            print(to_json(view))
        else:
            self.console.print(f"pipeline {pipeline_id}: {view.state}{' - ' + view.reason if view.reason else ''}")
        return 0 if view.state == "READY" else 1

    def _deploy(self, model: str | None, stages: int, layout: list[str], pipeline_id: str, transport: str):
        """Deploy ``model`` (default: the embedded model) and wait for READY or FAILED."""
        model = model if model is not None else default_model_dir()
        with self.bus() as bus:
            bus.request(
                ev.DeployPipeline,
                pipeline_id=pipeline_id,
                model_dir=str(Path(model).resolve()),
                num_stages=stages,
                layout=layout,
                transport=transport,
            )
        return self._wait_for(pipeline_id, ("READY", "FAILED"), self.args.wait_timeout)

    def _wait_for(self, pipeline_id: str, states: tuple[str, ...], timeout_s: float) -> ev.PipelineView:
        with self.bus() as bus:
            return wait_for_pipeline(bus, pipeline_id, states, timeout_s)

    def undeploy(self) -> int:
        with self.bus() as bus:
            bus.request(ev.UndeployPipeline, pipeline_id=self.args.pipeline_id)
        self.console.print(f"pipeline {self.args.pipeline_id} undeployed")
        return 0

    def gateway(self) -> GatewayClient:
        """The gateway named by ``--url``, else the first one the controller knows."""
        url = self.args.url
        if not url:
            url = next((h.http_address for h in self.status().engine_hosts if h.http_address), "")
        if not url:
            raise FlexPipeError("no gateway is registered with the controller; give its address with --url")
        return GatewayClient(url, self.args.timeout)

    def _model(self, client: GatewayClient) -> str:
        """``--model`` (a model name or a pipeline id), else the only model served."""
        if self.args.model:
            return self.args.model
        models = client.models()
        if len(models) != 1:
            raise FlexPipeError(f"name the model with --model; served: {models}")
        return models[0]

    def generate(self) -> int:
        body = {
            "prompt": self.args.prompt,
            "max_tokens": self.args.max_tokens,
            "temperature": self.args.temperature,
            "ignore_eos": self.args.ignore_eos,
            "stream_options": {"include_usage": True},
        }
        if self.args.seed is not None:
            body["seed"] = self.args.seed
        with self.gateway() as client:
            body["model"] = self._model(client)
            text, finish_reason, usage = [], None, {}
            for event in client.stream("/v1/completions", body):
                for choice in event["choices"]:
                    text.append(choice["text"])
                    finish_reason = choice["finish_reason"] or finish_reason
                    if not self.args.json:
                        print(choice["text"], end="", flush=True)
                usage = event.get("usage") or usage
        if self.args.json:
            print(
                json.dumps(
                    {"model": body["model"], "text": "".join(text), "finish_reason": finish_reason, "usage": usage}
                )
            )
        else:
            print()
            self.console.print(f"({finish_reason}, {usage.get('completion_tokens', 0)} tokens)", style="dim")
        return 0

    def chat(self) -> int:
        """A conversation: each line read is a user turn, each answer streams as it is generated."""
        messages = [{"role": "system", "content": self.args.system}] if self.args.system else []
        with self.gateway() as client:
            model = self._model(client)
            turns = [self.args.message] if self.args.message is not None else _read_turns(self.console)
            for turn in turns:
                messages.append({"role": "user", "content": turn})
                body = {"model": model, "messages": messages, "max_tokens": self.args.max_tokens}
                body["temperature"] = self.args.temperature
                answer = []
                for event in client.stream("/v1/chat/completions", body):
                    for choice in event["choices"]:
                        piece = choice["delta"].get("content") or ""
                        answer.append(piece)
                        print(piece, end="", flush=True)
                print()
                messages.append({"role": "assistant", "content": "".join(answer)})
        return 0

    def plan(self) -> int:
        """``fpctl plan PIPELINE``: what a refactor would move, and the estimated bytes and stall, doing nothing;
        ``fpctl plan --trace FILE``: the policy's decisions on a replayed trace (``trace_plan``)."""
        if self.args.trace:
            return trace_plan(self.args, self.config, self.console)
        if not self.args.pipeline_id:
            raise FlexPipeError("name the pipeline to plan a refactor of, or give --trace FILE to replay a trace")
        return self._refactor(dry_run=True)

    def profile(self) -> int:
        """``fpctl profile``: throughput and latency per stage count, measured by the data plane's own command in a
        child process (the control plane never imports torch) and stored with the model for the policy."""
        command = [sys.executable, "-m", "dataplane.profile", self.args.model or default_model_dir()]
        command += ["--stages", self.args.stages] if self.args.stages else []
        command += ["--batch", str(self.args.batch)] if self.args.batch else []
        command += ["--force"] if self.args.force else []
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=child_environment())
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            return result.returncode or 1
        profile = load_profile(self.args.model or default_model_dir())
        if self.args.json:
            print(to_json({"path": lines[-1], "profile": profile}))
        else:
            self.console.print(f"profile stored in {lines[-1]}", soft_wrap=True)
            for c in profile.candidates if profile else []:
                speed = f"{c.throughput_tokens_per_s:.1f} tokens/s, TPOT {c.latency_s * 1e3:.1f} ms"
                self.console.print(
                    f"  {c.num_stages} stages: {speed}, TTFT {c.ttft_s * 1e3:.0f} ms (batch {c.batch_size})"
                )
        return 0

    def events(self) -> int:
        """``fpctl events``: the policy's decisions so far; with ``--follow``, new ones and the outcomes of those
        still in progress as they come (a decision is shown again when its outcome changes; Ctrl-C ends)."""
        if self.args.limit < 1:
            raise FlexPipeError("--limit must be at least 1")
        shown: dict[int, str] = {}  # seq -> the outcome printed
        first = True
        with self.bus() as bus:
            while first or self.args.follow:
                unsettled = [seq for seq, outcome in shown.items() if outcome == "issued"]
                after = min(unsettled) - 1 if unsettled else max(shown, default=0)
                reply = bus.request(ev.PolicyEventsRequest, after=after, limit=self.args.limit)
                fresh = [d for d in reply.decisions if shown.get(d.seq) != d.outcome]
                shown.update({d.seq: d.outcome for d in reply.decisions})
                if self.args.json and not self.args.follow:
                    print(to_json(fresh))
                elif self.args.json:
                    for decision in fresh:
                        print(msgspec.json.encode(decision).decode(), flush=True)
                else:
                    print_decisions(self.console, fresh, reply.view.at)
                    if first and not reply.decisions:
                        self.console.print(f"no decisions yet (policy {_policy_state(reply.view)})")
                first = False
                if self.args.follow:
                    time.sleep(1.0)
        return 0

    def policy(self) -> int:
        """``fpctl policy pause|resume``: changes in progress finish; nothing new is decided while paused."""
        with self.bus() as bus:
            reply = bus.request(ev.PolicyControl, action=self.args.action)
        if self.args.json:
            print(to_json(reply.view))
        else:
            self.console.print(f"policy {_policy_state(reply.view)}")
        return 0

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


def _policy_state(view: ev.PolicyView) -> str:
    return "paused" if view.paused else f"running ({view.mode})"


def trace_plan(args: argparse.Namespace, config, console: Console) -> int:
    """``fpctl plan --trace``: replay the trace (rescaled to ``--cv``) through the monitor, policy and allocator
    in virtual time, on ``--inventory`` or the local cluster ``fpctl up`` would start; print each decision."""
    from common.topology import load_inventory
    from controlplane.policy.estimate import load_candidates
    from controlplane.simulation.replay import replay
    from controlplane.simulation.traces import read_azure_trace, with_cv
    from controlplane.simulation.virtual_cluster import local_inventory

    if args.workers is not None and args.workers < 1:
        raise FlexPipeError("--workers must be at least 1")
    if args.cv is not None and not (math.isfinite(args.cv) and args.cv >= 0):
        raise FlexPipeError(f"--cv must be a finite number >= 0, not {args.cv}")
    if args.limit_requests is not None and args.limit_requests < 1:
        raise FlexPipeError("--limit-requests must be at least 1")
    requests = read_azure_trace(args.trace, limit=args.limit_requests)
    if args.cv is not None:
        requests = with_cv(requests, args.cv, seed=args.seed)
    model = args.model or default_model_dir()
    limits = config.policy.limits(Path(model).name)
    candidates = load_candidates(model, limits.min_stages, limits.max_stages)
    inventory = (
        load_inventory(args.inventory)
        if args.inventory
        else local_inventory(args.workers or config.cluster.workers, config.cluster.worker_memory)
    )
    profile = load_profile(model)
    kinds = {d.kind for d in inventory.devices.values()}
    if profile is not None and profile.device.split(":")[0] not in kinds:
        print(
            f"fpctl: note: the profile was measured on {profile.device!r}; the inventory has {sorted(kinds)}",
            file=sys.stderr,
        )
    policy = replace(config.policy, mode="flexpipe")
    result = replay(requests, model, policy, candidates, inventory, initial_stages=args.stages or 1, cv=args.cv or 0.0)
    if args.json:
        print(
            to_json(
                {
                    "requests": result.requests,
                    "duration_s": result.duration_s,
                    "decisions": [
                        dict(msgspec.to_builtins(d), layout=layout)
                        for d, layout in zip(result.decisions, result.layouts)
                    ],
                }
            )
        )
    else:
        by_kind = Counter(f"{d.kind} {d.outcome}" for d in result.decisions)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(by_kind.items())) or "none"
        console.print(f"{result.requests} requests over {result.duration_s:.0f} s; decisions: {summary}")
        for decision, layout in zip(result.decisions, result.layouts):
            console.print(decision_line(decision), soft_wrap=True, highlight=False, markup=False)
            replicas = ", ".join(
                f"{p}: {r['stages']} on {','.join(r['devices'])}" for p, r in layout["replicas"].items()
            )
            console.print(f"    layout: {replicas}", soft_wrap=True, highlight=False, markup=False)
    return 0


def _read_turns(console: Console):
    """User turns from the terminal (or a pipe) until end of input or ``/exit``."""
    while True:
        try:
            line = console.input("[bold]you>[/bold] ") if sys.stdin.isatty() else input()
        except EOFError:
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip():
            yield line


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
    up = sub.add_parser("up", help="start a local cluster and its gateway; with --stages or --model, serve a model")
    up.add_argument("--workers", type=int, help="number of workers (default: from the configuration)")
    up.add_argument("--host", help="address the gateway listens on (default: [gateway] host, 127.0.0.1)")
    up.add_argument("--port", type=int, help="the gateway's HTTP port (default: [gateway] port, 8000; 0 = any)")
    up.add_argument("--model", help="checkpoint directory to deploy (default: the embedded SmolLM2-135M-Instruct)")
    up.add_argument("--stages", type=int, help="deploy the model on this many stages")
    up.add_argument("--pipeline", help="id of the deployed pipeline (default: p0)")
    up.add_argument("--wait-timeout", type=float, default=300.0, help="seconds to wait for the pipeline")
    up.add_argument(
        "--policy", choices=("flexpipe", "static"), help="flexpipe: stages and replicas follow the traffic (default)"
    )
    sub.add_parser("down", help="stop the local cluster")
    for name in ("status", "workers", "pipelines"):
        shown = sub.add_parser(name, help=f"show {name}")
        shown.add_argument("--wide", action="store_true", help="every column (default: what fits 80 columns)")
    deploy = sub.add_parser("deploy", help="deploy a model as a pipeline")
    deploy.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    deploy.add_argument("--stages", type=int, help="number of stages (the partitioner cuts)")
    deploy.add_argument("--layout", help="explicit unit ranges, e.g. embed..L1.mlp,L2.attn..head")
    deploy.add_argument("--pipeline", help="pipeline id (default: generated)")
    deploy.add_argument("--transport", default="shm", help="data-plane transport (default: %(default)s)")
    deploy.add_argument("--wait-timeout", type=float, default=120.0, help="seconds to wait for READY")
    undeploy = sub.add_parser("undeploy", help="remove a pipeline")
    undeploy.add_argument("pipeline_id")
    generate = sub.add_parser("generate", help="complete a prompt through the gateway, streaming the text")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=16)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--ignore-eos", action="store_true")
    chat = sub.add_parser("chat", help="talk to a model through the gateway (each input line is a turn)")
    chat.add_argument("--system", help="a system message first")
    chat.add_argument("--message", help="send this one message and exit (default: read turns from standard input)")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    for command in (generate, chat):
        command.add_argument(
            "--model", "--pipeline", dest="model", help="model name or pipeline id (default: the only one)"
        )
        command.add_argument("--url", help="the gateway's address, http://HOST:PORT (default: from the controller)")
    for name, help_text in (
        ("plan", "show what a refactor would move (PIPELINE), or replay a trace through the policy (--trace)"),
        ("refactor", "re-shape a serving pipeline in flight"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("pipeline_id", nargs="?" if name == "plan" else None)
        command.add_argument(
            "--stages", type=int, help="target number of stages (plan --trace: the stage count the replay starts at)"
        )
        command.add_argument("--layout", help="target unit ranges, e.g. embed..L1.attn,L1.mlp..head")
        command.add_argument("--migrate", help="stage indices to move to other workers, e.g. 1 or 0,2")
        command.add_argument("--wait-timeout", type=float, default=300.0, help="seconds to wait for the outcome")
    plan = sub.choices["plan"]
    plan.add_argument("--trace", metavar="FILE", help="an Azure LLM trace CSV to replay in virtual time")
    plan.add_argument("--cv", type=float, help="rescale inter-arrival times to this CV, keeping the mean rate")
    plan.add_argument("--inventory", metavar="FILE", help="TOML inventory (default: the local cluster's workers)")
    plan.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    plan.add_argument("--workers", type=int, help="workers of the local inventory (default: [cluster] workers)")
    plan.add_argument("--limit-requests", type=int, help="replay only the first N requests")
    plan.add_argument("--seed", type=int, default=0, help="seed of the CV rescaling (default: %(default)s)")
    profile = sub.add_parser("profile", help="measure throughput and latency per stage count; the policy uses it")
    profile.add_argument("--model", help="checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    profile.add_argument("--stages", help="stage counts to measure, e.g. 1,2,4 (default: 1 up to 4)")
    profile.add_argument("--batch", type=int, help="concurrent requests per measurement (default: 8)")
    profile.add_argument("--force", action="store_true", help="measure again even if a stored profile fits")
    events = sub.add_parser("events", help="the policy's decisions, each with the inputs it saw")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new decisions (Ctrl-C ends)")
    events.add_argument("--limit", type=int, default=200, help="at most this many at once (default: %(default)s)")
    policy = sub.add_parser("policy", help="pause or resume the autoscaling policy")
    policy.add_argument("action", choices=("pause", "resume"))
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
