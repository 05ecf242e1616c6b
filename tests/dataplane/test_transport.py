"""Tests for the data-plane transports (shm, tcp, gloo) over real ZeroMQ sockets and real processes.

The GPU kinds (cuda_ipc, nccl) are covered in ``test_transport_gpu.py``; here only their
refusal on a CPU host is checked. Every wait is bounded; spawned children are killed if
they outlive a test, and no shared-memory ring file of this process may be left behind.
"""

from __future__ import annotations

import os
import threading
import time
import traceback

import msgspec
import pytest
import torch
import zmq
from transport_support import SPAWN, assert_same, free_port, queue_get, spawned

from common.errors import TransportError
from common.runtime import shared_memory_dir
from dataplane.transport import TRANSPORTS, Inbox, Outbox, check_transport, inbox_address, open_outbox
from dataplane.transport.shm import FLAG_BYTES, ShmOutbox

RECV_MS = 30_000  # the longest any single recv may wait
CHILD_JOIN_S = 60  # the longest a child may take to finish after the test is done with it


# ----------------------------------------------------------------------------- helpers


def sample_tensors(seed: int) -> list[torch.Tensor]:
    """Deterministic tensors of every interesting kind: dtypes, empty, non-contiguous, 0-dim,
    and odd byte sizes (so that slot offsets must be aligned)."""
    g = torch.Generator().manual_seed(seed)
    non_contiguous = torch.randn(6, 8, generator=g)[::2, 1::3]
    assert not non_contiguous.is_contiguous()
    return [
        torch.randn(3, 5, generator=g),  # f32
        torch.randn(4, 7, generator=g).to(torch.bfloat16),  # bf16
        torch.randint(-(2**40), 2**40, (11,), generator=g),  # i64, values beyond 32 bits
        torch.empty(0, 4),  # empty
        non_contiguous,  # strided view
        torch.randint(0, 256, (3,), dtype=torch.uint8, generator=g),  # 3 bytes: misaligns what follows
        torch.tensor(float(seed) + 0.25, dtype=torch.float64),  # 0-dim
        torch.randn(2, 3, generator=g).to(torch.float16),  # f16
        torch.randint(-1000, 1000, (5,), dtype=torch.int32, generator=g),  # i32
    ]


def ring_files(pid: int) -> list[str]:
    return sorted(p.name for p in shared_memory_dir().glob(f"flexpipe-{pid}-*"))


@pytest.fixture(autouse=True)
def no_leftovers():
    before = set(ring_files(os.getpid()))
    yield
    leaked = set(ring_files(os.getpid())) - before
    for name in leaked:
        (shared_memory_dir() / name).unlink(missing_ok=True)
    alive = SPAWN.active_children()
    for process in alive:
        process.kill()
        process.join(timeout=10)
    assert not leaked, f"shared-memory ring files left behind: {sorted(leaked)}"
    assert not alive, f"child processes left running: {[p.pid for p in alive]}"


def make_pair(kind: str, context: zmq.Context, session_dir: str, name: str = "inbox", **shm_options):
    inbox = Inbox(context, inbox_address(kind, session_dir, name))
    if kind == "shm" and shm_options:
        outbox = ShmOutbox(context, inbox.address, **shm_options)
    else:
        outbox = open_outbox(kind, context, inbox.address)
    return inbox, outbox


# ----------------------------------------------------------------------------- names and addresses


def test_check_transport_rejects_unknown_names(context, session_dir):
    for kind in TRANSPORTS:
        assert check_transport(kind) == kind
    with pytest.raises(TransportError) as info:
        check_transport("bogus")
    message = str(info.value)
    assert "bogus" in message
    for kind in TRANSPORTS:
        assert kind in message
    with pytest.raises(TransportError, match="bogus"):
        open_outbox("bogus", context, "tcp://127.0.0.1:1")
    with pytest.raises(TransportError, match="bogus"):
        inbox_address("bogus", session_dir, "x")
    with pytest.raises(TransportError):
        check_transport("SHM")  # names are exact


def test_inbox_address_per_kind(context, session_dir):
    assert inbox_address("shm", session_dir, "s0") == f"ipc://{session_dir}/s0.sock"
    assert inbox_address("cuda_ipc", session_dir, "s0") == f"ipc://{session_dir}/s0.sock"
    for kind in ("tcp", "nccl", "gloo"):
        assert inbox_address(kind, session_dir, "s0") == "tcp://127.0.0.1:0"
    tcp_inbox = Inbox(context, inbox_address("tcp", session_dir, "s0"))
    ipc_inbox = Inbox(context, inbox_address("shm", session_dir, "s1"))
    try:
        host, port = tcp_inbox.address.removeprefix("tcp://").rsplit(":", 1)
        assert host == "127.0.0.1" and 0 < int(port) < 65536
        assert ipc_inbox.address == f"ipc://{session_dir}/s1.sock"
        assert os.path.exists(f"{session_dir}/s1.sock")
    finally:
        tcp_inbox.close()
        ipc_inbox.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on hosts without CUDA")
def test_gpu_kinds_refused_without_cuda(context, session_dir):
    from dataplane.transport import torch_dist

    inbox = Inbox(context, inbox_address("cuda_ipc", session_dir, "gpu"))
    try:
        with pytest.raises(TransportError, match=r"cuda_ipc.*CUDA") as info:
            open_outbox("cuda_ipc", context, inbox.address, device="cuda:0")
        assert "shm" in str(info.value)  # tells the user what to use instead
        with pytest.raises(TransportError, match=r"nccl.*CUDA"):
            torch_dist.init_group("nccl", f"tcp://127.0.0.1:{free_port()}", 0, 2)
    finally:
        inbox.close()


# ----------------------------------------------------------------------------- timeouts


def test_recv_times_out_with_none(context, session_dir):
    inbox = Inbox(context, inbox_address("tcp", session_dir, "idle"))
    try:
        start = time.monotonic()
        assert inbox.recv(timeout_ms=100) is None
        assert 0.05 <= time.monotonic() - start < 5
    finally:
        inbox.close()


def test_send_without_receiver_times_out(context):
    """ZeroMQ queues up to its high-water mark for a peer not there yet; past that, send
    gives up after ``timeout_s`` with a TransportError instead of blocking forever."""
    outbox = Outbox(context, f"tcp://127.0.0.1:{free_port()}", timeout_s=0.3)
    try:
        start = time.monotonic()
        with pytest.raises(TransportError, match="no receiver"):
            for _ in range(100_000):
                outbox.send(b"header", [torch.ones(4)])
        assert time.monotonic() - start < 10
    finally:
        outbox.close()


# ----------------------------------------------------------------------------- round trips (shm, tcp)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_round_trip_between_threads(kind, context, session_dir):
    inbox = Inbox(context, inbox_address(kind, session_dir, "rt"))
    plan = [
        (b"mixed", sample_tensors(1)),
        (b"header only", []),
        (b"", sample_tensors(2)),  # empty header
        (bytes(range(256)) * 4, [torch.arange(10)]),  # binary header, one tensor
        (b"all empty", [torch.empty(0), torch.empty(3, 0, dtype=torch.bfloat16)]),
        (b"scalar", [torch.tensor(7)]),
    ]
    originals = [[t.clone() for t in tensors] for _, tensors in plan]
    errors: list[BaseException] = []
    received = threading.Event()

    def sender() -> None:
        outbox = open_outbox(kind, context, inbox.address)
        try:
            for header, tensors in plan:
                outbox.send(header, tensors)
            received.wait(30)  # closing with LINGER 0 would drop frames not yet taken
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)
        finally:
            outbox.close()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        for (header, _), expected in zip(plan, originals):
            message = inbox.recv(RECV_MS)
            assert message is not None, "message did not arrive"
            assert message.header == header
            assert_same(expected, message.tensors)
            message.release()
    finally:
        received.set()
        thread.join(30)
        inbox.close()
    assert not thread.is_alive()
    assert not errors, errors
    for (_, tensors), expected in zip(plan, originals):
        assert_same(expected, tensors)  # sending does not modify the caller's tensors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_order_of_200_messages_preserved(kind, context, session_dir):
    count = 200
    inbox = Inbox(context, inbox_address(kind, session_dir, "order"))
    errors: list[BaseException] = []
    done = threading.Event()

    def sender() -> None:
        # 200 messages through a 16-slot ring: the sender must wait for releases
        outbox = open_outbox(kind, context, inbox.address, num_slots=16, slot_bytes=1 << 16)
        try:
            for i in range(count):
                tensors = (
                    [] if i % 7 == 3 else [torch.full((i % 5 + 1, 3), i, dtype=torch.int64), torch.tensor(float(i))]
                )
                outbox.send(f"msg-{i}".encode(), tensors)
            done.wait(60)
        except BaseException as exc:
            errors.append(exc)
        finally:
            outbox.close()

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        for i in range(count):
            message = inbox.recv(RECV_MS)
            assert message is not None, f"message {i} did not arrive"
            assert message.header == f"msg-{i}".encode()
            if i % 7 == 3:
                assert message.tensors == []
            else:
                assert_same([torch.full((i % 5 + 1, 3), i, dtype=torch.int64), torch.tensor(float(i))], message.tensors)
            message.release()
        assert inbox.recv(50) is None
    finally:
        done.set()
        thread.join(30)
        inbox.close()
    assert not errors, errors


@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_unsupported_dtype_is_refused_without_leaking_a_slot(kind, context, session_dir):
    inbox, outbox = make_pair(kind, context, session_dir, num_slots=1, slot_bytes=4096, timeout_s=0.5)
    try:
        with pytest.raises(TransportError, match="bool"):
            outbox.send(b"bad", [torch.ones(2), torch.zeros(3, dtype=torch.bool)])
        outbox.send(b"good", [torch.ones(2)])  # the only slot is still free
        message = inbox.recv(RECV_MS)
        assert message.header == b"good"
        assert_same([torch.ones(2)], message.tensors)
        message.release()
        assert inbox.recv(50) is None
    finally:
        outbox.close()
        inbox.close()


# ----------------------------------------------------------------------------- shm specifics


def test_shm_tensors_are_zero_copy_views_of_the_ring(context, session_dir):
    inbox, outbox = make_pair("shm", context, session_dir, num_slots=4, slot_bytes=1 << 16)
    try:
        sent = sample_tensors(3)
        outbox.send(b"zc", sent)
        message = inbox.recv(RECV_MS)
        assert_same(sent, message.tensors)
        ring = outbox.ring
        busy = [slot for slot in range(ring.num_slots) if ring.map[slot]]
        assert len(busy) == 1, "one message takes one slot"
        slot = busy[0]

        mapping = inbox._readers["shm"].maps[str(ring.path)]
        base = torch.frombuffer(mapping, dtype=torch.uint8).data_ptr()
        slot_start = base + FLAG_BYTES + slot * ring.slot_bytes
        for tensor in message.tensors:
            if tensor.numel():
                assert slot_start <= tensor.data_ptr() < slot_start + ring.slot_bytes
                assert tensor.data_ptr() % 64 == 0, "tensors start at aligned offsets"

        # the sender rewrites the slot in place: the received tensor changes with it
        first = message.tensors[0]
        ring.write(slot, 0, torch.full_like(first, 42.0))
        assert torch.equal(first, torch.full_like(first, 42.0))

        assert ring.map[slot] == 1
        message.release()
        assert ring.map[slot] == 0
        message.release()  # idempotent
        assert ring.map[slot] == 0
    finally:
        outbox.close()
        inbox.close()


def test_shm_tensors_stay_readable_after_both_ends_close(context, session_dir):
    inbox, outbox = make_pair("shm", context, session_dir, num_slots=2, slot_bytes=1 << 16)
    sent = sample_tensors(5)
    outbox.send(b"late", sent)
    message = inbox.recv(RECV_MS)
    inbox.close()
    outbox.close()
    assert not outbox.ring.path.exists(), "the ring file is removed even while a reader's tensor holds its pages"
    assert_same(sent, message.tensors)
    assert repr(message.tensors[0]).startswith("tensor(")


@pytest.mark.timeout(60)
def test_shm_slot_reused_only_after_release(context, session_dir):
    inbox = Inbox(context, inbox_address("shm", session_dir, "slots"))
    outbox = ShmOutbox(context, inbox.address, num_slots=2, slot_bytes=4096, timeout_s=0.3)
    try:
        first, second, third = ([torch.full((16,), float(i)), torch.arange(i, i + 8)] for i in (1, 2, 3))
        outbox.send(b"1", first)
        outbox.send(b"2", second)
        held1, held2 = inbox.recv(RECV_MS), inbox.recv(RECV_MS)
        assert (held1.header, held2.header) == (b"1", b"2")

        start = time.monotonic()
        with pytest.raises(TransportError, match="released"):
            outbox.send(b"3", third)
        assert 0.25 <= time.monotonic() - start < 5, "send waits about timeout_s, no less and not much more"
        assert inbox.recv(50) is None, "a send that timed out sends nothing"

        held1.release()
        outbox.send(b"3", third)  # reuses the released slot
        message = inbox.recv(RECV_MS)
        assert message.header == b"3"
        assert_same(third, message.tensors)
        assert_same(second, held2.tensors)  # the unreleased slot was not touched

        with pytest.raises(TransportError):
            outbox.send(b"4", first)  # both slots busy again
        held2.release()
        message.release()
        outbox.send(b"4", first)
        message = inbox.recv(RECV_MS)
        assert_same(first, message.tensors)
        message.release()
    finally:
        outbox.close()
        inbox.close()


def test_shm_oversize_message_falls_back_to_inline_frames(context, session_dir):
    inbox = Inbox(context, inbox_address("shm", session_dir, "big"))
    outbox = ShmOutbox(context, inbox.address, num_slots=1, slot_bytes=4096, timeout_s=0.3)
    try:
        big = torch.randn(64, 64)  # 16 KiB: does not fit a 4 KiB slot
        pair = [torch.randn(513), torch.randn(513)]  # 2052 B each: each fits a slot, both do not
        messages = []
        for index, tensors in enumerate([[big], pair, [big.to(torch.bfloat16), torch.arange(3)]]):
            outbox.send(f"big-{index}".encode(), tensors)  # never waits for a slot
            message = inbox.recv(RECV_MS)
            assert message.header == f"big-{index}".encode()
            assert_same(tensors, message.tensors)
            messages.append(message)
        assert outbox.ring.map[0] == 0, "inline messages take no slot"
        assert "shm" not in inbox._readers

        small = [torch.arange(10)]
        outbox.send(b"small", small)  # still goes through the ring
        message = inbox.recv(RECV_MS)
        assert_same(small, message.tensors)
        assert outbox.ring.map[0] == 1
        message.release()
        for held in messages:
            held.release()
    finally:
        outbox.close()
        inbox.close()


def test_shm_ring_file_removed_on_close(context, session_dir):
    inbox = Inbox(context, inbox_address("shm", session_dir, "file"))
    outbox = ShmOutbox(context, inbox.address, num_slots=2, slot_bytes=4096)
    path = outbox.ring.path
    try:
        assert path.parent == shared_memory_dir()
        assert path.name.startswith(f"flexpipe-{os.getpid()}-")
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.stat().st_size == FLAG_BYTES + 2 * 4096
        outbox.send(b"x", [torch.ones(3)])
        message = inbox.recv(RECV_MS)
        assert_same([torch.ones(3)], message.tensors)
    finally:
        outbox.close()
    assert not path.exists()
    # the receiver's mapping outlives the file
    assert_same([torch.ones(3)], message.tensors)
    message.release()
    inbox.close()


def test_shm_ring_refuses_bad_slot_counts(context):
    for num_slots in (0, FLAG_BYTES + 1):
        with pytest.raises(TransportError, match="slots"):
            ShmOutbox(context, "tcp://127.0.0.1:1", num_slots=num_slots)


# ----------------------------------------------------------------------------- across processes


def _sender_child(kind: str, address: str, count: int, results, done) -> None:
    """Child process: sends ``count`` messages of sample tensors to ``address``."""
    context = zmq.Context()
    outbox = None
    try:
        if kind == "shm":
            outbox = ShmOutbox(context, address, num_slots=2, slot_bytes=1 << 16, timeout_s=30.0)
        else:
            outbox = open_outbox(kind, context, address)
        results.put(("pid", os.getpid()))
        outbox.send(b"0", sample_tensors(0))
        outbox.send(b"1", sample_tensors(1))
        if kind == "shm":
            # the parent holds messages 0 and 1 unreleased: the ring is full
            outbox.timeout_s = 0.3
            try:
                outbox.send(b"2", sample_tensors(2))
                blocked = False
            except TransportError:
                blocked = True
            outbox.timeout_s = 30.0
            results.put(("blocked", blocked))
        for i in range(2, count):
            outbox.send(str(i).encode(), sample_tensors(i))
        outbox.send(b"end")
        results.put(("sent", count))
        done.wait(CHILD_JOIN_S)
    except BaseException:
        results.put(("error", traceback.format_exc()))
    finally:
        if outbox is not None:
            outbox.close()
        context.destroy(linger=0)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_round_trip_from_another_process(kind, context, session_dir):
    count = 8
    inbox = Inbox(context, inbox_address(kind, session_dir, "parent"))
    results, done = SPAWN.Queue(), SPAWN.Event()
    try:
        with spawned((_sender_child, (kind, inbox.address, count, results, done))) as (child,):
            child_pid = queue_get(results, "pid")
            held = [inbox.recv(RECV_MS), inbox.recv(RECV_MS)]
            for i, message in enumerate(held):
                assert message is not None and message.header == str(i).encode()
                assert_same(sample_tensors(i), message.tensors)
            if kind == "shm":
                assert ring_files(child_pid), "the child's ring lives in shared memory"
                assert queue_get(results, "blocked") is True, "the child's ring must stay full until we release"
                assert_same(sample_tensors(0), held[0].tensors)  # not overwritten meanwhile
            for message in held:
                message.release()
            for i in range(2, count):
                message = inbox.recv(RECV_MS)
                assert message is not None, f"message {i} did not arrive"
                assert message.header == str(i).encode()
                assert_same(sample_tensors(i), message.tensors)
                message.release()
            end = inbox.recv(RECV_MS)
            assert end.header == b"end" and end.tensors == []
            assert queue_get(results, "sent") == count
            done.set()
            child.join(CHILD_JOIN_S)
            assert child.exitcode == 0
        assert not ring_files(child_pid), "the child removed its ring file on close"
    finally:
        done.set()
        inbox.close()
        results.close()
        results.join_thread()


# ----------------------------------------------------------------------------- gloo (torch.distributed P2P)

GLOO_PLAN = [(b"g0", 0), (b"g-header-only", None), (b"g1", 1), (b"g2", 2)]


def _gloo_rank(rank: int, init_method: str, addresses, results) -> None:
    """Child process: rank 1 owns the Inbox and checks what arrives; rank 0 sends."""
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    from dataplane.transport import torch_dist

    context = zmq.Context()
    box = None
    try:
        torch_dist.init_group("gloo", init_method, rank, 2, timeout_s=60)
        if rank == 1:
            box = Inbox(context, inbox_address("gloo", "", "rank1"))
            addresses.put(box.address)
            for header, seed in GLOO_PLAN:
                message = box.recv(RECV_MS)
                if message is None:
                    raise AssertionError(f"message {header!r} did not arrive")
                if message.header != header:
                    raise AssertionError(f"got header {message.header!r}, expected {header!r}")
                assert_same([] if seed is None else sample_tensors(seed), message.tensors)
                message.release()
            if box.recv(100) is not None:
                raise AssertionError("an unexpected extra message arrived")
            results.put(("ok", rank))
        else:
            box = open_outbox("gloo", context, addresses.get(timeout=60), rank=0, dst_rank=1)
            for header, seed in GLOO_PLAN:
                box.send(header, [] if seed is None else sample_tensors(seed))
            results.put(("ok", rank))
        dist.barrier()  # rank 0 keeps its sockets until rank 1 has everything
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        if box is not None:
            box.close()
        context.destroy(linger=0)
        torch_dist.close_group()


@pytest.mark.timeout(240)
def test_gloo_point_to_point_between_processes():
    init_method = f"tcp://127.0.0.1:{free_port()}"
    addresses, results = SPAWN.Queue(), SPAWN.Queue()
    try:
        with spawned(
            (_gloo_rank, (0, init_method, addresses, results)), (_gloo_rank, (1, init_method, addresses, results))
        ) as ranks:
            reported = sorted(queue_get(results, "ok", timeout_s=120) for _ in ranks)
            assert reported == [0, 1]
            for process in ranks:
                process.join(CHILD_JOIN_S)
            assert [p.exitcode for p in ranks] == [0, 0]
    finally:
        for q in (addresses, results):
            q.close()
            q.join_thread()


# ----------------------------------------------------------------------------- malformed input


def _entry(dtype="f32", shape=(2,), where=("frame", 0)):
    return [dtype, list(shape), list(where)]


def _meta(*entries) -> bytes:
    return msgspec.msgpack.encode(list(entries))


EIGHT_BYTES = b"\0" * 8

# each case builds the frames after the header; ``victim`` is a file of ours outside shared
# memory that the Inbox must neither map nor write
MALFORMED = {
    "meta not msgpack": lambda victim: [b"\xc1\xc1\xc1"],
    "meta truncated": lambda victim: [_meta(_entry())[:-2]],
    "meta not a list": lambda victim: [msgspec.msgpack.encode({"a": 1})],
    "entry too short": lambda victim: [_meta(["f32", [2]]), EIGHT_BYTES],
    "entry not a list": lambda victim: [_meta(7), EIGHT_BYTES],
    "unknown dtype": lambda victim: [_meta(_entry(dtype="f8e4")), EIGHT_BYTES],
    "unknown location kind": lambda victim: [_meta(_entry(where=("carrier-pigeon", 0))), EIGHT_BYTES],
    "missing frame": lambda victim: [_meta(_entry(where=("frame", 3))), EIGHT_BYTES],
    "shape does not match the frame": lambda victim: [_meta(_entry(shape=(100,))), EIGHT_BYTES],
    "shm file outside shared memory": lambda victim: [_meta(_entry(where=("shm", victim, 0, 0, 64)))],
    "shm path escapes shared memory": lambda victim: [
        _meta(_entry(where=("shm", f"{shared_memory_dir()}/../..{victim}", 0, 0, 64)))
    ],
    "shm file missing": lambda victim: [
        _meta(_entry(where=("shm", f"{shared_memory_dir()}/flexpipe-0-doesnotexist", 0, 0, 64)))
    ],
}


@pytest.mark.parametrize("make_frames", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_message_raises_transport_error(make_frames, context, session_dir):
    victim = os.path.join(session_dir, "victim")
    with open(victim, "wb") as file:
        file.write(b"\xff" * 4096)
    frames = make_frames(victim)
    inbox = Inbox(context, inbox_address("tcp", session_dir, "bad"))
    raw = context.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SNDTIMEO, 5000)
    raw.connect(inbox.address)
    try:
        raw.send_multipart([b"header", *frames])
        with pytest.raises(TransportError):
            inbox.recv(RECV_MS)
        # the inbox keeps working after a bad message
        raw.send_multipart([b"fine", msgspec.msgpack.encode([_entry()]), torch.tensor([1.5, 2.5]).numpy().tobytes()])
        message = inbox.recv(RECV_MS)
        assert message.header == b"fine"
        assert_same([torch.tensor([1.5, 2.5])], message.tensors)
        message.release()
    finally:
        raw.close(linger=0)
        inbox.close()
    with open(victim, "rb") as file:
        assert file.read() == b"\xff" * 4096


def test_malformed_shm_entries_release_what_was_read(context, session_dir):
    """A bad entry after a good shm entry: the error frees the slot the good one pinned,
    and out-of-range slots of a real ring are refused."""
    inbox = Inbox(context, inbox_address("shm", session_dir, "badshm"))
    outbox = ShmOutbox(context, inbox.address, num_slots=2, slot_bytes=4096, timeout_s=0.3)
    raw = context.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SNDTIMEO, 5000)
    raw.connect(inbox.address)
    try:
        ring = outbox.ring
        slot = ring.acquire(0.1)
        ring.write(slot, 0, torch.ones(4))
        good = _entry(shape=(4,), where=("shm", str(ring.path), slot, 0, ring.slot_bytes))
        raw.send_multipart([b"h", msgspec.msgpack.encode([good, _entry(dtype="nope")])])
        with pytest.raises(TransportError):
            inbox.recv(RECV_MS)
        assert ring.map[slot] == 0, "the slot pinned by the good entry was released"

        for bad_slot in (-1, FLAG_BYTES, "0"):
            entry = _entry(shape=(1,), where=("shm", str(ring.path), bad_slot, 0, ring.slot_bytes))
            raw.send_multipart([b"h", msgspec.msgpack.encode([entry])])
            with pytest.raises(TransportError):
                inbox.recv(RECV_MS)
        entry = _entry(shape=(1 << 20,), where=("shm", str(ring.path), 0, 0, ring.slot_bytes))
        raw.send_multipart([b"h", msgspec.msgpack.encode([entry])])
        with pytest.raises(TransportError):
            inbox.recv(RECV_MS)  # beyond the end of the ring file
    finally:
        raw.close(linger=0)
        outbox.close()
        inbox.close()
