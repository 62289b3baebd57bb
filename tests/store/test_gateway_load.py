"""The gateway under hostile load, on real loopback sockets: idle floods, slowloris, oversized
requests, per-peer and overall connection bounds, idle timeouts, big blobs, a prompt stop.

Many peers are played from one machine by binding client sockets to different 127.0.0.0/8
addresses (all loopback on Linux). Time bounds are generous: they separate "answers" from
"hangs"; latency figures are in benchmarks/bench_gateway.py.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from covey.errors import ConfigError
from covey.store.gateway import Gateway, GatewayLimits, peer_of
from covey.store.local import LocalStore

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="plays many peers on 127.0.0.0/8 (Linux)"
)


@pytest.fixture(autouse=True, scope="module")
def enough_file_descriptors() -> None:
    """500 client sockets plus the server's side of each live in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


Clients = Callable[..., list[socket.socket]]


@pytest.fixture
def clients() -> Iterator[Clients]:
    """Open idle client connections (`count`, spread over `peers` loopback addresses): one after
    the other, each given 1 s to connect (those that fail are left out, as an attacker would),
    or `at_once` (non-blocking: every SYN is sent before any handshake completes); all are
    closed when the test ends."""
    opened: list[socket.socket] = []

    def open_idle(
        gateway: Gateway | str,
        count: int,
        peers: int = 1,
        first_peer: int = 2,
        at_once: bool = False,
    ) -> list[socket.socket]:
        made = []
        for i in range(count):
            source = source_for(first_peer + i % peers)
            if at_once:
                s = socket.socket()
                s.setblocking(False)
                s.bind((source, 0))
                s.connect_ex(address(gateway))
            else:
                s = socket.socket()
                s.settimeout(1)
                s.bind((source, 0))
                try:
                    s.connect(address(gateway))
                except OSError:
                    s.close()
                    continue
            made.append(s)
            opened.append(s)
        return made

    yield open_idle
    for s in opened:
        s.close()


def source_for(n: int) -> str:
    """The n-th loopback address after 127.0.0.1, as a distinct peer (127.0.0.2, ...)."""
    return f"127.0.{n // 250}.{n % 250 + 1}" if n else "127.0.0.1"


def address(gateway: Gateway | str) -> tuple[str, int]:
    url = gateway if isinstance(gateway, str) else gateway.url
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(gateway: Gateway | str, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(address(gateway), timeout=5, source_address=(source, 0))


def get(
    gateway: Gateway | str, path: str, source: str = "127.0.0.1", method: str = "GET"
) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one request on a fresh connection, as an honest peer asks."""
    started = time.monotonic()
    host, port = address(gateway)
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        return response.status, body, time.monotonic() - started
    finally:
        conn.close()


def raw_request(gateway: Gateway, data: bytes) -> bytes:
    """What the server answers to `data` before it closes (or 3 s pass)."""
    with connect(gateway) as s:
        s.sendall(data)
        s.settimeout(3)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def is_closed(s: socket.socket) -> bool:
    """Whether the server closed `s` (EOF or reset), without waiting; a 503 counts as closed
    once its close arrives."""
    while select.select([s], [], [], 0)[0]:
        try:
            if not s.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError:
            return True
    return False


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- floods of idle connections ------------------------------------------------------------


FD_LIMIT = 400  # below the flood, as any limit can be (1024 is a common default)
SERVE = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), hard))
from covey.store.gateway import Gateway
from covey.store.local import LocalStore
with Gateway(LocalStore(sys.argv[1])) as gateway:
    print(gateway.url, flush=True)
    sys.stdin.read()
"""


@contextmanager
def gateway_process(store: LocalStore, fd_limit: int) -> Iterator[str]:
    """A gateway in its own process, as a participant runs it, with `fd_limit` descriptors;
    yields its URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    command = [sys.executable, "-c", SERVE, str(store.root), str(fd_limit)]
    with subprocess.Popen(command, env=env, **pipes) as proc:  # type: ignore[call-overload]
        try:
            yield proc.stdout.readline().strip()
        finally:
            proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.parametrize("peers", [1, 50], ids=["from-one-peer", "from-50-peers"])
def test_an_honest_fetch_is_answered_while_500_idle_connections_are_open(
    store: LocalStore, clients: Clients, peers: int
) -> None:
    """500 idle sockets, opened at once, against a gateway process allowed fewer descriptors
    than that (the old server gave each connection a thread and a descriptor for ever, and
    let no one else in once either ran out)."""
    data = os.urandom(2_000_000)
    cid = store.put(data)
    with gateway_process(store, fd_limit=FD_LIMIT) as url:
        idle = clients(url, 500, peers=peers)
        status, body, seconds = get(url, f"/ipfs/{cid}")  # from 127.0.0.1, its own peer
        assert status == 200 and body == data
        assert seconds < 5, f"an honest fetch took {seconds:.1f} s behind 500 idle sockets"
        limits = GatewayLimits()
        held = min(limits.max_connections_per_peer * peers, limits.max_connections)
        assert wait_until(lambda: sum(map(is_closed, idle)) >= len(idle) - held, 5), (
            "the gateway kept more connections than its bounds"
        )


def test_idle_connections_are_closed_after_the_idle_timeout(
    store: LocalStore, clients: Clients
) -> None:
    cid = store.put(b"blob")
    limits = GatewayLimits(idle_timeout=1.0)
    with Gateway(store, limits=limits) as gateway:
        idle = clients(gateway, 40, peers=10)
        kept_alive = connect(gateway)  # one honest request, then the connection is left open
        kept_alive.sendall(f"GET /ipfs/{cid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert kept_alive.recv(65536).startswith(b"HTTP/1.1 200")
        sockets = [*idle, kept_alive]
        time.sleep(0.5)
        assert sum(map(is_closed, sockets)) == 0, "closed before the idle timeout"
        assert wait_until(lambda: all(map(is_closed, sockets)), 3), (
            f"{sum(not is_closed(s) for s in sockets)} of {len(sockets)} idle sockets still open"
        )
        assert wait_until(lambda: gateway.stats()["open"] == 0, 1)
        assert gateway.stats()["idle_closed"] == len(sockets)
        kept_alive.close()


def test_stop_is_prompt_and_releases_every_socket(store: LocalStore, clients: Clients) -> None:
    before = open_fds()
    gateway = Gateway(store).start()
    idle = clients(gateway, 500, peers=50, at_once=True)
    assert wait_until(lambda: gateway.stats()["open"] >= 250, 5)
    started = time.monotonic()
    gateway.stop()
    assert time.monotonic() - started < 2, "stop() waited on idle connections"
    gateway.stop()  # a second stop is harmless
    assert wait_until(lambda: all(map(is_closed, idle)), 2), "stop() left connections open"
    with pytest.raises(ConnectionRefusedError):
        connect(gateway)
    for s in idle:
        s.close()
    assert open_fds() <= before, "the gateway kept sockets open after stop()"


# --- slow and oversized requests ------------------------------------------------------------


def test_a_slowloris_request_is_cut_off_at_its_deadline(store: LocalStore) -> None:
    cid = store.put(b"blob")
    limits = GatewayLimits(request_timeout=1.0, idle_timeout=5.0)
    with Gateway(store, limits=limits) as gateway, connect(gateway) as slow:
        request = f"GET /ipfs/{cid} HTTP/1.1\r\nHost: x\r\nX-Padding: {'a' * 100}".encode()
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 4 and not is_closed(slow):
            try:
                slow.send(request[sent : sent + 1])  # a byte every 0.1 s: never idle
            except OSError:
                break
            sent += 1
            time.sleep(0.1)
        lasted = time.monotonic() - started
        assert lasted < 2.5, f"a request dripped a byte at a time was kept {lasted:.1f} s"
        assert sent >= 8  # it was cut by the request deadline, not at once
        assert get(gateway, f"/ipfs/{cid}")[0] == 200
        assert gateway.stats()["request_timed_out"] == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /ipfs/" + b"b" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"431"),
        (b"GET /ipfs/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
        (b"GET /ipfs/x HTTP/1.1\r\nHost: x\r\n" + b"X-Many: a\r\n" * 1000 + b"\r\n", b"431"),
        (b"GET /ipfs/x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789", b"413"),
        (b"GET /ipfs/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n", b"413"),
        (b"POST /ipfs/x HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
        (b"DELETE /ipfs/x HTTP/1.0\r\nHost: x\r\n\r\n", b"405"),
        (b"GET /../../etc/passwd HTTP/1.0\r\nHost: x\r\n\r\n", b"404"),
        (b"GET /ipfs/../local.py HTTP/1.0\r\nHost: x\r\n\r\n", b"400"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n", b"400"),
    ],
    ids=[
        "long-request-line",
        "long-header",
        "many-headers",
        "body",
        "chunked-body",
        "post",
        "delete",
        "outside-ipfs",
        "traversal",
        "tls-hello",
    ],
)
def test_oversized_or_unexpected_requests_get_a_small_error(
    store: LocalStore, request_bytes: bytes, status: bytes
) -> None:
    with Gateway(store) as gateway:
        answer = raw_request(gateway, request_bytes)
        assert answer.split(b" ", 2)[1] == status, answer[:200]
        assert len(answer) < 1000


def test_head_answers_the_headers_of_get_without_the_body(store: LocalStore) -> None:
    cid = store.put(b"adapter bytes")
    with Gateway(store) as gateway:
        answer = raw_request(gateway, f"HEAD /ipfs/{cid} HTTP/1.0\r\n\r\n".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and body == b""
        assert b"Content-Length: 13" in head and b"Content-Type: application/vnd.ipld.raw" in head
        assert f'Etag: "{cid}.raw"'.encode() in head and b"immutable" in head


# --- connection bounds ----------------------------------------------------------------------


def test_a_peer_beyond_its_bound_replaces_its_longest_idle_connection(
    store: LocalStore, clients: Clients
) -> None:
    cid = store.put(b"blob")
    limits = GatewayLimits(max_connections_per_peer=4)
    with Gateway(store, limits=limits) as gateway:
        first, *others = clients(gateway, 4, peers=1)
        time.sleep(0.2)
        assert not any(map(is_closed, [first, *others]))
        assert get(gateway, f"/ipfs/{cid}", source=source_for(2))[0] == 200  # connection 5
        assert wait_until(lambda: is_closed(first), 1), "the oldest idle connection was kept"
        assert not any(map(is_closed, others))
        assert gateway.stats()["evicted"] == 1


def test_all_peers_beyond_the_overall_bound_replace_the_longest_idle_connection(
    store: LocalStore, clients: Clients
) -> None:
    cid = store.put(b"blob")
    limits = GatewayLimits(max_connections=8, max_connections_per_peer=2)
    with Gateway(store, limits=limits) as gateway:
        idle = clients(gateway, 8, peers=8)  # 8 peers, one connection each
        time.sleep(0.2)
        assert get(gateway, f"/ipfs/{cid}", source=source_for(100))[0] == 200
        assert wait_until(lambda: is_closed(idle[0]), 1)
        assert not any(map(is_closed, idle[1:]))


def test_a_peer_whose_connections_are_all_being_answered_is_refused(store: LocalStore) -> None:
    big = store.put(os.urandom(32 << 20))
    small = store.put(b"small")
    limits = GatewayLimits(max_connections_per_peer=2)
    with Gateway(store, limits=limits) as gateway:
        stalled = []
        for _ in range(2):  # each asks for 32 MB and reads only the status line
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.bind((source_for(2), 0))
            s.settimeout(5)
            s.connect(address(gateway))
            s.sendall(f"GET /ipfs/{big} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(12) == b"HTTP/1.1 200"
            stalled.append(s)
        try:
            assert refused(gateway, f"/ipfs/{small}", source=source_for(2))
            assert get(gateway, f"/ipfs/{small}", source=source_for(3))[0] == 200
            assert gateway.stats()["refused"] == 1
        finally:
            for s in stalled:
                s.close()


def refused(gateway: Gateway, path: str, source: str) -> bool:
    """Whether a request is turned away: a 503, or a reset in its place (a refused connection is
    closed at once, and the client may see either)."""
    try:
        return get(gateway, path, source)[0] == 503
    except (ConnectionError, http.client.HTTPException):
        return True


# --- big blobs ------------------------------------------------------------------------------


def test_a_large_blob_is_streamed_from_its_file_not_loaded_whole(store: LocalStore) -> None:
    data = os.urandom(64 << 20)
    cid = store.put(data)
    expected = hashlib.sha256(data).digest()
    del data
    with Gateway(store) as gateway:
        host, port = address(gateway)
        tracemalloc.start()
        try:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", f"/ipfs/{cid}")
            response = conn.getresponse()
            digest = hashlib.sha256()
            while chunk := response.read(1 << 20):
                digest.update(chunk)
            conn.close()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert response.status == 200 and digest.digest() == expected
        assert peak < 16 << 20, f"serving 64 MB allocated {peak / 2**20:.0f} MB"


def test_a_client_that_stops_reading_a_blob_blocks_no_one(store: LocalStore) -> None:
    big = store.put(os.urandom(32 << 20))
    small = store.put(b"small")
    with Gateway(store, limits=GatewayLimits(threads=1)) as gateway:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(5)
        stuck.connect(address(gateway))
        stuck.sendall(f"GET /ipfs/{big} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert stuck.recv(12) == b"HTTP/1.1 200"
        try:  # the only worker thread handed the file to the event loop and is free again
            status, body, seconds = get(gateway, f"/ipfs/{small}")
            assert (status, body) == (200, b"small") and seconds < 3
        finally:
            stuck.close()


# --- settings -------------------------------------------------------------------------------


def test_limits_are_checked() -> None:
    with pytest.raises(ConfigError, match="idle_timeout=0"):
        GatewayLimits(idle_timeout=0)
    with pytest.raises(ConfigError, match="max_connections_per_peer=9 is above"):
        GatewayLimits(max_connections=8, max_connections_per_peer=9)


def test_peers_are_addresses_or_ipv6_64s() -> None:
    assert peer_of("10.0.0.2") == "10.0.0.2"
    assert peer_of("::ffff:10.0.0.2") == "10.0.0.2"
    assert peer_of("2001:db8:1:2:aaaa::1") == peer_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert peer_of("2001:db8:1:3::1") != peer_of("2001:db8:1:2::1")


@pytest.mark.slow
def test_the_default_deadlines_hold(store: LocalStore, clients: Clients) -> None:
    """With the default limits: a slowloris is cut after `request_timeout` (5 s), a silent
    socket after `idle_timeout` (10 s)."""
    limits = GatewayLimits()
    with Gateway(store) as gateway:
        silent = clients(gateway, 1)[0]
        slow = clients(gateway, 1, first_peer=3)[0]
        started = time.monotonic()
        for byte in b"GET /ipfs/x HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":
            if is_closed(slow):
                break
            slow.send(bytes([byte]))
            time.sleep(0.25)
        cut = time.monotonic() - started
        assert limits.request_timeout <= cut < limits.request_timeout + 1.5
        assert not is_closed(silent)
        assert wait_until(lambda: is_closed(silent), limits.idle_timeout - cut + 1.5)
        assert time.monotonic() - started >= limits.idle_timeout


def test_many_threads_fetching_at_once_all_get_their_blob(store: LocalStore) -> None:
    blobs = [store.put(os.urandom(200_000 + i)) for i in range(8)]
    results: list[int] = []
    with Gateway(store) as gateway:

        def fetch_all() -> None:
            for cid in blobs:
                status, body, _ = get(gateway, f"/ipfs/{cid}")
                results.append(status if len(body) >= 200_000 else -1)

        threads = [threading.Thread(target=fetch_all) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert results == [200] * 48
