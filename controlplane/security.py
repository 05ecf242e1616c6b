"""CURVE security for the control bus's TCP endpoints: key files, secured sockets, the ZAP authenticator.

A key directory holds a ``server`` key pair (used by every process that binds a TCP
endpoint: the controller, engine hosts), a ``client`` key pair (used by every process
that connects), and ``authorized/`` with the public certificates servers accept. Both
of our own public keys are authorised, so servers can also call each other; another
host's client key is authorised by copying its ``client.key`` into ``authorized/``
under any name ending in ``.key``.

IPC and inproc endpoints need no CURVE: the 0700 runtime directory protects them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from common.errors import FlexPipeError

OnDenied = Callable[[str, str], None]

_log = logging.getLogger(__name__)


class SecurityError(FlexPipeError):
    """Keys are missing, unreadable or too open, or an endpoint would run without the protection it needs."""


@dataclass(frozen=True)
class KeyPaths:
    """The files of one key directory. Invariant once returned by ``init_keys`` or ``load_keys``:
    all of them exist, secret files are readable by their owner only."""

    key_dir: Path
    server_public: Path
    server_secret: Path
    client_public: Path
    client_secret: Path
    authorized_dir: Path

    @classmethod
    def under(cls, key_dir: Path) -> KeyPaths:
        key_dir = Path(key_dir).expanduser()
        return cls(
            key_dir=key_dir,
            server_public=key_dir / "server.key",
            server_secret=key_dir / "server.key_secret",
            client_public=key_dir / "client.key",
            client_secret=key_dir / "client.key_secret",
            authorized_dir=key_dir / "authorized",
        )

    @property
    def pair_files(self) -> list[Path]:
        return [self.server_public, self.server_secret, self.client_public, self.client_secret]

    @property
    def key_files(self) -> list[Path]:
        """Every file ``init_keys`` writes."""
        return [*self.pair_files, self.authorized_dir / "server.key", self.authorized_dir / "client.key"]


def default_key_dir() -> Path:
    return Path(os.environ.get("FLEXPIPE_KEY_DIR") or Path.home() / ".config" / "flexpipe" / "keys")


def init_keys(key_dir: Path, *, force: bool = False) -> KeyPaths:
    """Create the key directory (0700), both key pairs (secrets 0600) and ``authorized/``.

    Existing keys are never replaced unless ``force``: peers that hold the old public keys
    would be refused from then on.
    """
    keys = KeyPaths.under(key_dir)
    existing = [path.name for path in keys.key_files if path.exists()]
    if existing and not force:
        raise SecurityError(
            f"CURVE keys already exist in {keys.key_dir} ({', '.join(existing)}); they were left "
            "untouched. Replace them with --force (peers holding the old public keys will be refused)."
        )
    try:
        for directory in (keys.key_dir, keys.authorized_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        for name, public, secret in (
            ("server", keys.server_public, keys.server_secret),
            ("client", keys.client_public, keys.client_secret),
        ):
            zmq.auth.create_certificates(keys.key_dir, name)
            secret.chmod(0o600)
            public.chmod(0o644)
            shutil.copyfile(public, keys.authorized_dir / public.name)
            (keys.authorized_dir / public.name).chmod(0o644)
    except OSError as exc:
        raise SecurityError(f"cannot write CURVE keys to {keys.key_dir}: {exc}") from exc
    return keys


def load_keys(key_dir: Path) -> KeyPaths:
    """The keys in ``key_dir``, checked: present, parseable, and not readable or replaceable by others."""
    keys = KeyPaths.under(key_dir)
    missing = [str(path) for path in keys.pair_files if not path.is_file()]
    if missing or not keys.authorized_dir.is_dir():
        what = ", ".join(missing) if missing else str(keys.authorized_dir)
        raise SecurityError(
            f"CURVE keys missing in {keys.key_dir} ({what}): run `fpctl keys init`, "
            "or copy the key directory of the controller's host"
        )
    for directory in (keys.key_dir, keys.authorized_dir):
        _refuse_if_open(directory, 0o022, "writable by other users")
    for secret in (keys.server_secret, keys.client_secret):
        _refuse_if_open(secret, 0o077, "accessible to other users")
        _read_key_pair(secret)
    _read_public_key(keys.server_public)
    if not list(keys.authorized_dir.glob("*.key")):
        raise SecurityError(f"{keys.authorized_dir} holds no public certificate (*.key): every peer would be refused")
    return keys


def _refuse_if_open(path: Path, forbidden_bits: int, meaning: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & forbidden_bits:
        fix = "700" if path.is_dir() else "600"
        raise SecurityError(f"{path} is {meaning} (mode {mode:o}); run `chmod {fix} {path}`")


def _read_key_pair(secret_file: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read CURVE certificate {secret_file}: {exc}") from exc
    if secret is None:
        raise SecurityError(f"{secret_file} holds no secret key")
    return public, secret


def _read_public_key(public_file: Path) -> bytes:
    try:
        return zmq.auth.load_certificate(public_file)[0]
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read CURVE certificate {public_file}: {exc}") from exc


def secure_server_socket(socket: zmq.Socket, keys: KeyPaths) -> None:
    """Make ``socket`` a CURVE server with this host's server key pair; call before ``bind``."""
    public, secret = _read_key_pair(keys.server_secret)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def secure_client_socket(socket: zmq.Socket, keys: KeyPaths) -> None:
    """Make ``socket`` a CURVE client that trusts the server key in ``keys``; call before ``connect``."""
    public, secret = _read_key_pair(keys.client_secret)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = _read_public_key(keys.server_public)


class CurveAuthenticator(ThreadAuthenticator):
    """The ZAP handler of one context: admits CURVE peers whose public key is in ``authorized/``.

    Every peer it refuses is reported as ``on_denied(peer_ip, reason)``, from a background
    thread. NULL-mechanism peers pass (they reach only the context's ipc/inproc sockets).
    libzmq refuses a peer without CURVE, or with the wrong server key, during the greeting,
    before any ZAP request: those are seen only on sockets passed to ``watch``, and their IP
    is not known ("unknown"). Invariant: after ``stop()`` no thread it started is running.
    """

    def __init__(self, context: zmq.Context, on_denied: OnDenied) -> None:
        super().__init__(context)
        self._on_denied = on_denied
        self._peer = ("", "")
        self._watchers: list[_HandshakeWatcher] = []

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        address, mechanism = (msg[3], msg[5]) if len(msg) >= 6 else (b"", b"")
        self._peer = (address.decode("utf-8", "replace"), mechanism.decode("ascii", "replace"))
        await super().handle_zap_message(msg)

    def _send_zap_reply(
        self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous"
    ) -> None:
        # The base class sends every verdict through here, malformed requests included.
        super()._send_zap_reply(request_id, status_code, status_text, user_id)
        if status_code != b"200":
            address, mechanism = self._peer
            self.report(address, f"{mechanism or 'ZAP'}: {status_text.decode('utf-8', 'replace')}")

    def report(self, address: str, reason: str) -> None:
        try:
            self._on_denied(address, reason)
        except Exception:  # noqa: BLE001 -- a raising callback must not end the thread that answers every handshake
            _log.exception("on_denied callback failed for %s (%s)", address, reason)

    def watch(self, socket: zmq.Socket) -> None:
        """Also report peers that ``socket`` (a CURVE server) refuses before ZAP is asked."""
        watcher = _HandshakeWatcher(socket, self.report)
        watcher.start()
        self._watchers.append(watcher)

    def stop(self) -> None:
        """Stop every thread; call it after the watched sockets are closed, or from their thread."""
        for watcher in self._watchers:
            watcher.stop()
        self._watchers.clear()
        super().stop()


_GREETING_FAILURES = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "no CURVE offered (a plain ZeroMQ peer?)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "CURVE handshake undecryptable (wrong server key?)",
}


class _HandshakeWatcher(threading.Thread):
    """Reports handshake protocol failures of one socket, read from its monitor."""

    def __init__(self, socket: zmq.Socket, report: OnDenied) -> None:
        super().__init__(name="flexpipe-handshake-watcher", daemon=True)
        self.watched = socket
        self._report = report
        self._stopping = threading.Event()
        endpoint = f"inproc://flexpipe-handshakes-{id(self)}"
        socket.monitor(endpoint, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_MONITOR_STOPPED)
        self.events = socket.context.socket(zmq.PAIR)
        self.events.connect(endpoint)

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.events.poll(100):
                    continue
                event = parse_monitor_message(self.events.recv_multipart())
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                code = int(event["value"])
                reason = _GREETING_FAILURES.get(code, f"handshake protocol error {code:#x}")
                self._report("unknown", f"{reason} on {event['endpoint'].decode('utf-8', 'replace')}")
        finally:
            self.events.close(linger=0)

    def stop(self) -> None:
        self._stopping.set()
        if not self.watched.closed:
            self.watched.disable_monitor()
        self.join(timeout=5)


def start_authenticator(context: zmq.Context, keys: KeyPaths, on_denied: OnDenied) -> CurveAuthenticator:
    """Start the ZAP handler of ``context``, admitting the public keys in ``keys.authorized_dir``.

    Start it before binding CURVE sockets; ``stop()`` it before terminating the context.
    """
    authenticator = CurveAuthenticator(context, on_denied)
    authenticator.configure_curve(domain="*", location=str(keys.authorized_dir))
    if not authenticator.certs.get("*"):
        raise SecurityError(f"no readable public certificate in {keys.authorized_dir}: every peer would be refused")
    authenticator.start()
    return authenticator


def check_insecure_endpoint(endpoint: str, insecure: bool) -> None:
    """Raise ``SecurityError`` unless ``endpoint`` may run without CURVE.

    ipc:// and inproc:// may. Plain tcp:// may only when ``insecure`` and every host in it is
    loopback (127.0.0.0/8, ::1, localhost). Any other transport may not.
    """
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return
    if transport != "tcp" or not address:
        raise SecurityError(f"{endpoint!r}: only tcp://, ipc:// and inproc:// endpoints are supported")
    if not insecure:
        raise SecurityError(
            f"{endpoint}: TCP endpoints use CURVE; plain TCP needs the insecure option and a loopback address"
        )
    # zmq's "tcp://source;destination" form: both ends must be loopback.
    hosts = [_host_of(part, endpoint) for part in address.split(";")]
    outside = [host for host in hosts if not _is_loopback(host)]
    if outside:
        raise SecurityError(
            f"{endpoint}: plain TCP without CURVE is allowed only on loopback "
            f"(127.0.0.0/8, ::1, localhost), not on {', '.join(outside)}"
        )


def _host_of(address: str, endpoint: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port:
        raise SecurityError(f"{endpoint!r} is not a tcp://host:port endpoint")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # an interface name or "*": possibly reachable from outside
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)
