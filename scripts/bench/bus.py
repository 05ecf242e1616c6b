"""Control-bus speed: one-way events/s and command round trips, over ipc:// and over tcp:// with CURVE.

Two processes: this script is the client (DEALER); it starts itself again with ``--serve``
as the server (ROUTER), which decodes, and so validates, every message with
``common.wire.decode`` and answers every command with an ``Ack``.

* one way: the client sends N ``Heartbeat`` events, then a ``StatusRequest`` as end mark;
  the server reports the seconds from the first heartbeat to the mark (events_per_s) and
  the client the seconds from its first send to the mark's Ack (events_per_s_end_to_end);
* round trip: M sequential ``StatusRequest`` commands, each awaiting its ``Ack``.

Prints exactly one JSON object on stdout; progress goes to stderr.

    PYTHONPATH=. python scripts/bench/bus.py [--events 200000] [--tcp-events 100000] [--round-trips 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import zmq

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.events import Ack, Command, Heartbeat, ShutdownRequest, StatusRequest
from common.runtime import new_session_dir
from common.wire import WireError, decode, encode
from controlplane import security

TARGETS = {"events_per_s_min": 50_000, "ipc_rtt_p99_us_max": 1000}
SERVER_NAME = "bench-bus-server"
CLIENT_NAME = "bench-bus-client"
SERVER_START_TIMEOUT_S = 30.0
SERVER_ANSWER_TIMEOUT_S = 120.0
REPLY_TIMEOUT_MS = 10_000
SERVER_IDLE_EXIT_MS = 60_000
WARMUP_ROUND_TRIPS = 500


def log(*args) -> None:
    print("[bus]", *args, file=sys.stderr, flush=True)


# ---- server role ---------------------------------------------------------------------------


def serve(endpoint: str, key_dir: str | None) -> None:
    """Bind, announce the bound endpoint on stdout, answer until a ``ShutdownRequest``."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvtimeo = SERVER_IDLE_EXIT_MS  # an orphaned server (its client died) exits on its own
    authenticator = None
    try:
        if key_dir:
            keys = security.load_keys(Path(key_dir))
            authenticator = security.start_authenticator(context, keys, lambda peer, why: log("denied", peer, why))
            security.secure_server_socket(router, keys)
        if endpoint.endswith(":0"):
            endpoint = f"{endpoint[:-2]}:{router.bind_to_random_port(endpoint[:-2])}"
        else:
            router.bind(endpoint)
        announce({"ready": endpoint})
        answer_until_shutdown(router)
    except zmq.Again:
        log(f"bench server idle for {SERVER_IDLE_EXIT_MS / 1000:.0f} s; exiting")
    finally:
        router.close(linger=0)
        if authenticator is not None:
            authenticator.stop()
        context.term()


def answer_until_shutdown(router: zmq.Socket) -> None:
    # Two recv() calls, not recv_multipart(): its per-message RCVMORE reads halve the rate.
    # Our DEALER sends single-frame messages, so each arrives as exactly [identity, payload].
    recv, send = router.recv, router.send_multipart
    heartbeats, first_heartbeat_at = 0, 0.0
    while True:
        identity, data = recv(), recv()
        try:
            event = decode(data)
        except WireError as error:
            send([identity, encode(error.reply(SERVER_NAME))])
            continue
        if type(event) is Heartbeat:
            if not heartbeats:
                first_heartbeat_at = time.perf_counter()
            heartbeats += 1
            continue
        if heartbeats:
            announce({"heartbeats": heartbeats, "seconds": time.perf_counter() - first_heartbeat_at})
            heartbeats = 0
        if isinstance(event, Command):
            send([identity, encode(Ack(sender=SERVER_NAME, reply_to=event.cmd_id))])
        if type(event) is ShutdownRequest:
            return


def announce(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# ---- client role -----------------------------------------------------------------------------


class ServerProcess:
    """The server role in a child process. Invariant: after ``__exit__`` the child has exited."""

    def __init__(self, endpoint: str, key_dir: Path | None) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", endpoint]
        if key_dir is not None:
            command += ["--key-dir", str(key_dir)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()
        try:
            self.endpoint = self.next_message(SERVER_START_TIMEOUT_S)["ready"]
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def _read_lines(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next_message(self, timeout_s: float = SERVER_ANSWER_TIMEOUT_S) -> dict:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"bench server said nothing for {timeout_s:.0f} s") from None
        if line is None:
            raise RuntimeError(f"bench server exited with status {self.process.wait()}")
        return json.loads(line)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log("bench server did not stop; killing it")
            self.process.kill()
            self.process.wait()


def measure(endpoint: str, key_dir: Path | None, events: int, round_trips: int) -> dict:
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.rcvtimeo = REPLY_TIMEOUT_MS
    dealer.sndtimeo = REPLY_TIMEOUT_MS
    try:
        with ServerProcess(endpoint, key_dir) as server:
            try:
                if key_dir is not None:
                    security.secure_client_socket(dealer, security.load_keys(key_dir))
                dealer.connect(server.endpoint)
                rtt_ns = time_round_trips(dealer, WARMUP_ROUND_TRIPS + round_trips)[WARMUP_ROUND_TRIPS:]
                end_to_end_s = send_heartbeats(dealer, events)
                one_way = server.next_message()
            finally:
                ask_to_stop(dealer)
        if one_way["heartbeats"] != events:
            raise RuntimeError(f"server received {one_way['heartbeats']} of {events} heartbeats")
        return {
            "events": events,
            "events_per_s": round(events / one_way["seconds"]),
            "events_per_s_end_to_end": round(events / end_to_end_s),
            "round_trips": round_trips,
            "rtt_us": summarise(rtt_ns),
        }
    finally:
        dealer.close(linger=0)
        context.term()


def ask_to_stop(dealer: zmq.Socket) -> None:
    try:
        dealer.send(encode(ShutdownRequest(sender=CLIENT_NAME, cmd_id=0)))
    except zmq.ZMQError as error:  # the server is gone or stuck: ServerProcess kills it
        log(f"could not ask the bench server to stop: {error}")


def send_heartbeats(dealer: zmq.Socket, count: int) -> float:
    """Seconds from the first heartbeat sent to the Ack of the end mark that follows the last."""
    send = dealer.send
    started = time.perf_counter()
    for seq in range(count):
        send(encode(Heartbeat(sender=CLIENT_NAME, worker_id="bench-worker", seq=seq)))
    await_ack(dealer, cmd_id=1)
    return time.perf_counter() - started


def time_round_trips(dealer: zmq.Socket, count: int) -> list[int]:
    clock, samples = time.perf_counter_ns, []
    for cmd_id in range(2, count + 2):
        started = clock()
        await_ack(dealer, cmd_id)
        samples.append(clock() - started)
    return samples


def await_ack(dealer: zmq.Socket, cmd_id: int) -> None:
    dealer.send(encode(StatusRequest(sender=CLIENT_NAME, cmd_id=cmd_id)))
    try:
        reply = decode(dealer.recv())
    except zmq.Again:
        raise RuntimeError(f"no reply to command {cmd_id} within {REPLY_TIMEOUT_MS / 1000:.0f} s") from None
    if not isinstance(reply, Ack) or reply.reply_to != cmd_id:
        raise RuntimeError(f"expected the Ack of command {cmd_id}, got {reply!r}")


def summarise(samples_ns: list[int]) -> dict:
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 1)

    return {
        "p50": at(0.50),
        "p99": at(0.99),
        "max": round(ordered[-1] / 1000, 1),
        "mean": round(sum(ordered) / len(ordered) / 1000, 1),
    }


def host_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgspec": msgspec.__version__,
        "platform": platform.platform(),
    }


def cpu_model() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    return next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor()
    )


def run(args: argparse.Namespace) -> dict:
    ipc_dir = new_session_dir("bench-bus-")
    key_dir = Path(tempfile.mkdtemp(prefix="flexpipe-bench-keys-"))
    try:
        log(f"ipc: {args.events} heartbeats, {args.round_trips} round trips")
        ipc = measure(f"ipc://{ipc_dir}/bus.sock", None, args.events, args.round_trips)
        log("ipc:", ipc)
        keys = security.init_keys(key_dir / "keys")
        log(f"tcp + CURVE: {args.tcp_events} heartbeats, {args.round_trips} round trips")
        tcp = measure("tcp://127.0.0.1:0", keys.key_dir, args.tcp_events, args.round_trips)
        log("tcp + CURVE:", tcp)
    finally:
        shutil.rmtree(ipc_dir, ignore_errors=True)
        shutil.rmtree(key_dir, ignore_errors=True)
    meets = ipc["events_per_s"] >= TARGETS["events_per_s_min"] and ipc["rtt_us"]["p99"] < TARGETS["ipc_rtt_p99_us_max"]
    return {
        "benchmark": "bus",
        "ipc": ipc,
        "tcp_curve": tcp,
        "targets": TARGETS,
        "meets_targets": meets,
        "host": host_info(),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000, help="heartbeats sent one way over ipc")
    p.add_argument("--tcp-events", type=int, default=100_000, help="heartbeats sent one way over tcp + CURVE")
    p.add_argument("--round-trips", type=int, default=5_000, help="sequential commands timed per transport")
    p.add_argument("--serve", metavar="ENDPOINT", help=argparse.SUPPRESS)
    p.add_argument("--key-dir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.serve:
        serve(args.serve, args.key_dir)
        return
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
