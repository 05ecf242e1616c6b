"""CURVE keys, secured sockets and the ZAP authenticator, over real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import zmq
import zmq.auth

from controlplane.security import (
    SecurityError,
    check_insecure_endpoint,
    default_key_dir,
    init_keys,
    load_keys,
    secure_client_socket,
    secure_server_socket,
    start_authenticator,
)

pytestmark = pytest.mark.timeout(60)

NO_REPLY_WITHIN_MS = 500


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class Denials:
    """Records ``on_denied`` calls, which arrive from the authenticator's threads."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._changed = threading.Condition()

    def __call__(self, address: str, reason: str) -> None:
        with self._changed:
            self.calls.append((address, reason))
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[tuple[str, str]]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.calls) >= count, timeout=timeout_s)
            return list(self.calls)


class CurveServer:
    """A CURVE ROUTER on a random loopback port, its authenticator, and the clients made against it."""

    def __init__(self, keys, on_denied, watch: bool = True) -> None:
        self.keys = keys
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket] = []
        self.authenticator = start_authenticator(self.context, keys, on_denied)
        self.router = self.socket(zmq.ROUTER)
        secure_server_socket(self.router, keys)
        if watch:
            self.authenticator.watch(self.router)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def socket(self, kind: int) -> zmq.Socket:
        socket = self.context.socket(kind)
        socket.linger = 0
        self.sockets.append(socket)
        return socket

    def client(self, secure=None) -> zmq.Socket:
        dealer = self.socket(zmq.DEALER)
        if secure is not None:
            secure(dealer)
        dealer.connect(self.endpoint)
        return dealer

    def exchange(self, dealer: zmq.Socket, payload: bytes = b"ping") -> bytes | None:
        """The server's echo of ``payload``, or None if nothing got through within the bound."""
        dealer.send(payload)
        if not self.router.poll(NO_REPLY_WITHIN_MS):
            return None
        identity, message = self.router.recv_multipart()
        self.router.send_multipart([identity, b"echo:" + message])
        return dealer.recv() if dealer.poll(NO_REPLY_WITHIN_MS) else None

    def close(self) -> None:
        for socket in self.sockets:
            socket.close(linger=0)
        self.authenticator.stop()
        self.context.term()


@pytest.fixture
def keys(tmp_path):
    return init_keys(tmp_path / "keys")


@pytest.fixture
def denials():
    return Denials()


@pytest.fixture
def server(keys, denials):
    server = CurveServer(keys, denials)
    yield server
    server.close()


def load_server_public(keys) -> bytes:
    return zmq.auth.load_certificate(keys.server_public)[0]


def with_fresh_key_pair(server_public: bytes):
    def secure(socket: zmq.Socket) -> None:
        public, secret = zmq.curve_keypair()
        socket.curve_publickey, socket.curve_secretkey, socket.curve_serverkey = public, secret, server_public

    return secure


# ---- key files ------------------------------------------------------------------------------


def test_init_keys_writes_private_key_files(keys):
    assert mode_of(keys.key_dir) == 0o700
    assert mode_of(keys.server_secret) == 0o600 and mode_of(keys.client_secret) == 0o600
    assert sorted(path.name for path in keys.authorized_dir.iterdir()) == ["client.key", "server.key"]
    assert (keys.authorized_dir / "client.key").read_text() == keys.client_public.read_text()
    assert load_keys(keys.key_dir) == keys


def test_init_keys_refuses_to_overwrite_without_force(keys):
    before = keys.server_secret.read_bytes()
    with pytest.raises(SecurityError, match="already exist.*--force"):
        init_keys(keys.key_dir)
    assert keys.server_secret.read_bytes() == before

    init_keys(keys.key_dir, force=True)
    assert keys.server_secret.read_bytes() != before
    assert (keys.authorized_dir / "server.key").read_text() == keys.server_public.read_text()


def test_load_keys_explains_missing_keys(tmp_path):
    with pytest.raises(SecurityError, match="missing.*fpctl keys init"):
        load_keys(tmp_path / "nowhere")


def test_load_keys_refuses_a_secret_readable_by_others(keys):
    keys.client_secret.chmod(0o644)
    with pytest.raises(SecurityError, match="accessible to other users.*chmod 600"):
        load_keys(keys.key_dir)


def test_load_keys_refuses_a_key_directory_writable_by_others(keys):
    keys.authorized_dir.chmod(0o777)
    with pytest.raises(SecurityError, match="writable by other users"):
        load_keys(keys.key_dir)


def test_load_keys_refuses_an_empty_authorized_directory(keys):
    for certificate in keys.authorized_dir.iterdir():
        certificate.unlink()
    with pytest.raises(SecurityError, match="no public certificate"):
        load_keys(keys.key_dir)


def test_default_key_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXPIPE_KEY_DIR", str(tmp_path))
    assert default_key_dir() == tmp_path
    monkeypatch.delenv("FLEXPIPE_KEY_DIR")
    assert default_key_dir() == default_key_dir().home() / ".config" / "flexpipe" / "keys"


# ---- sockets ----------------------------------------------------------------------------------


def test_authorised_client_gets_a_reply(server, keys, denials):
    client = server.client(lambda socket: secure_client_socket(socket, keys))
    assert server.exchange(client) == b"echo:ping"
    assert denials.calls == []


def test_client_with_unauthorised_key_gets_nothing_and_is_reported(server, keys, denials):
    client = server.client(with_fresh_key_pair(load_server_public(keys)))
    assert server.exchange(client) is None
    assert ("127.0.0.1", "CURVE: Unknown key") in denials.wait_for(1)


def test_plain_client_gets_nothing_and_is_reported(server, denials):
    client = server.client()
    assert server.exchange(client) is None
    address, reason = denials.wait_for(1)[0]
    # libzmq drops a peer without CURVE at the greeting, before ZAP could name its address.
    assert address == "unknown" and "no CURVE offered" in reason and server.endpoint in reason


def test_client_with_wrong_server_key_gets_nothing_and_is_reported(server, keys, denials):
    def secure_against_another_server(socket: zmq.Socket) -> None:
        secure_client_socket(socket, keys)
        socket.curve_serverkey = zmq.curve_keypair()[0]

    client = server.client(secure_against_another_server)
    assert server.exchange(client) is None
    assert "wrong server key" in denials.wait_for(1)[0][1]


def test_a_failing_callback_does_not_stop_authentication(keys):
    def explode(address: str, reason: str) -> None:
        raise RuntimeError("callback bug")

    server = CurveServer(keys, explode)
    try:
        assert server.exchange(server.client(with_fresh_key_pair(load_server_public(keys)))) is None
        assert server.exchange(server.client(lambda socket: secure_client_socket(socket, keys))) == b"echo:ping"
    finally:
        server.close()


def test_ipc_sockets_in_the_same_context_still_connect(server, tmp_path, denials):
    endpoint = f"ipc://{tmp_path}/bus.sock"
    router, dealer = server.socket(zmq.ROUTER), server.socket(zmq.DEALER)
    router.bind(endpoint)
    dealer.connect(endpoint)
    dealer.send(b"hello")
    assert router.poll(2000) and router.recv_multipart()[1] == b"hello"
    assert denials.calls == []


def test_stop_ends_every_thread(keys, denials):
    before = set(threading.enumerate())
    CurveServer(keys, denials).close()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(threading.enumerate()) - before == set()


def test_start_authenticator_refuses_an_empty_authorized_directory(keys, denials):
    for certificate in keys.authorized_dir.iterdir():
        certificate.unlink()
    context = zmq.Context()
    try:
        with pytest.raises(SecurityError, match="no readable public certificate"):
            start_authenticator(context, keys, denials)
    finally:
        context.term()


# ---- endpoints that may run without CURVE ----------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:7700",
        "tcp://127.8.9.10:7700",
        "tcp://localhost:7700",
        "tcp://[::1]:7700",
        "tcp://127.0.0.1:0;127.0.0.1:7700",
    ],
)
def test_plain_tcp_is_allowed_on_loopback_when_insecure(endpoint):
    check_insecure_endpoint(endpoint, insecure=True)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://0.0.0.0:7700",
        "tcp://*:7700",
        "tcp://10.0.0.5:7700",
        "tcp://eth0:7700",
        "tcp://[::]:7700",
        "tcp://example.org:7700",
        "tcp://10.0.0.5:0;127.0.0.1:7700",
    ],
)
def test_plain_tcp_is_refused_off_loopback(endpoint):
    with pytest.raises(SecurityError, match="only on loopback"):
        check_insecure_endpoint(endpoint, insecure=True)


def test_plain_tcp_is_refused_without_the_insecure_option():
    with pytest.raises(SecurityError, match="use CURVE"):
        check_insecure_endpoint("tcp://127.0.0.1:7700", insecure=False)


@pytest.mark.parametrize("endpoint", ["ipc:///run/flexpipe/controller.sock", "inproc://actors"])
def test_ipc_and_inproc_need_no_curve(endpoint):
    check_insecure_endpoint(endpoint, insecure=False)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1", "udp://127.0.0.1:7700", "ws://127.0.0.1:7700", "nonsense"])
def test_malformed_or_unsupported_endpoints_are_refused(endpoint):
    with pytest.raises(SecurityError):
        check_insecure_endpoint(endpoint, insecure=True)
