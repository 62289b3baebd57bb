"""Serving content-addressed blobs over plain HTTP, as IPFS gateways do, to hostile peers too.

`Gateway` serves a `LocalStore` following the IPFS trustless-gateway convention: `GET
/ipfs/{cid}` answers the raw bytes of a blob (`application/vnd.ipld.raw`; a raw-codec CID names a
single block, so the block is the file). `HEAD` answers the same headers without the body; any
other method or path is a small error. The client side, `covey.store.fetch`, gets blobs back
from such gateways (Covey's own or any public IPFS gateway) and re-hashes them.

Every FLock participant runs one beside training, reachable by anyone, and a proposer whose
gateway is starved while it reveals is slashed; so the server must hold under load. It is
waitress (a maintained, pure-Python WSGI server) rather than `http.server`, which gave each
connection a thread with no timeout: 258 idle sockets held 254 threads and an honest fetch timed
out. Why waitress: its event loop reads requests and writes responses, so idle and slow
connections cost a socket, not a thread (only a complete request reaches one of `threads` worker
threads); it caps the request line + headers (`max_request_header_size`, 431) and the body
(`max_request_body_size`, 413); a `wsgi.file_wrapper` body is sent by the event loop straight
from the file, a send buffer at a time, so a blob of hundreds of MB neither sits in memory nor
holds a thread while a slow client reads it; it polls with `poll()` rather than `select()`, so
descriptors above 1024 work. What waitress lacks is added here on its documented hooks (its
channel and server classes), not by hand-written socket handling: (1) its `channel_timeout` is
an idle timeout that every received byte resets, so a slowloris client dripping a header byte a
second would be kept for ever; `request_timeout` is a deadline for a whole request, counted
from its first byte; (2) its `connection_limit` stops accepting at the bound, so whoever holds
the slots (idle sockets from many addresses) locks everyone else out until they time out; here
a peer (an IPv4 address or an IPv6 /64) holds at most `max_connections_per_peer` connections and
all peers at most `max_connections`, and a connection beyond either bound takes the slot of the
connection that has waited longest on its client (idle, or sending a request), which is closed;
only when every connection in the way is being answered is the newcomer refused (a best-effort
`503` and close). An attacker can then hold slots only by keeping requests in flight, which
costs it the blob's bytes, and honest fetches keep getting through. Considered and not chosen:
uvicorn, aiohttp and hypercorn (asyncio; none bounds connections per peer or the time to
receive headers either, and an ASGI app would read blobs in chunks itself), cheroot (a slow
request holds a worker thread while its headers are read).

Limits (`GatewayLimits`, defaults in brackets): `idle_timeout` [10 s] closes a connection that has
neither sent nor received a byte for that long (a fresh socket that sends nothing, a kept-alive
one between requests, a client that stopped reading a response); `request_timeout` [5 s] closes
one whose request line and headers are not complete that long after their first byte;
`max_connections` [256] and `max_connections_per_peer` [16] as above (a connection uses one file
descriptor, two while a blob is sent: `max_connections` is lowered to half of `ulimit -n` if
above it, with a warning, and if descriptors run out all the same the longest-waiting connection
is closed to free one);
`max_request_header_bytes` [8192] for the request line and headers together; no request body is
accepted; `threads` [4] answer complete requests (each re-hashes the blob it serves, so a worker
is busy for the time it takes to read the file once).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any, cast

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from covey.errors import ConfigError, DataError
from covey.store.cid import cid_for, cid_from_digest, digest_of
from covey.store.local import LocalStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger("covey.store")

RAW = "application/vnd.ipld.raw"
SWEEP_SECONDS = 0.25  # how often timeouts are checked (and the longest stop() waits for the loop)
HASH_CHUNK = 1 << 20
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 35\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many connections; retry shortly\n"
)


@dataclass(frozen=True)
class GatewayLimits:
    """How much any client may hold of a gateway (the module docstring says what each does)."""

    idle_timeout: float = 10.0
    request_timeout: float = 5.0
    max_connections: int = 256
    max_connections_per_peer: int = 16
    max_request_header_bytes: int = 8192
    threads: int = 4

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ConfigError(f"gateway limit {name}={value!r}: must be positive")
        if self.max_connections_per_peer > self.max_connections:
            raise ConfigError(
                f"gateway limits: max_connections_per_peer={self.max_connections_per_peer} is"
                f" above max_connections={self.max_connections}; lower it"
            )


class Gateway:
    """An HTTP server that answers `GET`/`HEAD /ipfs/{cid}` from `store` (and nothing else).

    Binds on construction (so `url` is known at once), serves from `start()` until `stop()`.
    """

    def __init__(
        self,
        store: LocalStore,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: GatewayLimits | None = None,
    ) -> None:
        self.store = store
        self.limits = _within_descriptor_limit(limits or GatewayLimits())
        # multiformats imports its hash functions on first use: do it now, not at the first
        # request, when a flood may have taken every file descriptor
        digest_of(cid_for(b""))
        adjustments = Adjustments(
            host=host,
            port=port,
            threads=self.limits.threads,
            ident="covey-gateway",
            max_request_header_size=self.limits.max_request_header_bytes,
            max_request_body_size=0,  # a Content-Length above 0, or any chunked body: 413
            asyncore_use_poll=True,
            log_socket_errors=False,  # resets from hostile or impatient peers are routine
        )
        self._map: dict[int, Any] = {}
        self.server = _Server(
            _BlobApp(store),
            self.limits,
            map=self._map,
            adj=adjustments,
            sockinfo=adjustments.listen[0],
        )
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where this gateway answers (the bound address; a port of 0 picks a free one)."""
        host, port = self.server.effective_host, self.server.effective_port
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def start(self) -> Gateway:
        self._thread = threading.Thread(target=self._serve, name="covey-gateway", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; returns within about a second."""
        if self._stopping.is_set():
            return  # stopped already
        self._stopping.set()
        if self._thread is None:
            self.server.close_everything()
            return
        self.server.pull_trigger()  # wake the event loop from poll()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.warning("gateway %s: the event loop did not stop within 10 s", self.url)

    def stats(self) -> dict[str, int]:
        """Open connections, and how many were timed out, evicted or refused (for monitoring)."""
        return {"open": len(self.server.channels()), **self.server.counts}

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        next_sweep = 0.0
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=SWEEP_SECONDS, map=self._map, use_poll=True, count=1)
                now = time.time()  # waitress stamps channel activity with time.time()
                if now >= next_sweep:
                    self.server.sweep(now)
                    next_sweep = now + SWEEP_SECONDS
        except Exception:
            log.exception("gateway %s: the event loop failed; no longer serving", self.url)
        finally:
            self.server.close_everything()


def _within_descriptor_limit(limits: GatewayLimits) -> GatewayLimits:
    """`limits` with max_connections lowered to half the process's file descriptor limit
    (`ulimit -n`), if above it: a connection sending a blob holds two, and the rest of the
    process needs some too."""
    try:
        import resource
    except ImportError:  # not on Unix: no limit to read
        return limits
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or limits.max_connections <= soft // 2:
        return limits
    most = max(1, soft // 2)
    log.warning(
        "gateway: max_connections %d lowered to %d, half this process's file descriptor limit"
        " (ulimit -n %d); raise that limit to serve more connections",
        limits.max_connections,
        most,
        soft,
    )
    return replace(
        limits,
        max_connections=most,
        max_connections_per_peer=min(limits.max_connections_per_peer, most),
    )


def peer_of(address: str) -> str:
    """The unit a connection bound applies to: an IPv4 address, or an IPv6 /64 (one host's
    usual allocation, so rotating through its addresses does not buy more slots)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Channel(HTTPChannel):
    """A waitress connection that remembers its peer and when its current request began."""

    request_started = 0.0

    def __init__(self, server: _Server, sock: socket.socket, addr: Any, adj: Adjustments,
                 map: dict[int, Any]) -> None:  # fmt: skip
        super().__init__(server, sock, addr, adj, map=map)
        self.peer = peer_of(str(addr[0]))

    def received(self, data: bytes) -> bool:
        if self.request is None:  # these bytes begin a request: its deadline starts now
            self.request_started = time.time()
        return super().received(data)

    def waiting_since(self) -> float | None:
        """When this connection began waiting on its client (idle, or still sending its
        request), or None while the server is answering it."""
        if self.requests or self.total_outbufs_len:
            return None
        return self.request_started if self.request is not None else self.last_activity


class _Server(TcpWSGIServer):
    """waitress's TCP server with per-peer and overall connection bounds that evict the
    longest-waiting connection, and a sweep for idle and unfinished-request timeouts."""

    effective_host: str  # set by waitress (numeric host and port, as getnameinfo gives them)
    effective_port: str

    def __init__(
        self, app: _BlobApp, limits: GatewayLimits, map: dict[int, Any], **kw: Any
    ) -> None:
        self.limits = limits
        self.socket_map = map
        self.counts = {"idle_closed": 0, "request_timed_out": 0, "evicted": 0, "refused": 0}
        super().__init__(app, map=map, **kw)

    def channels(self) -> list[_Channel]:
        return list(cast("dict[int, _Channel]", self.active_channels).values())

    def readable(self) -> bool:
        # waitress's own version runs its maintenance and stops accepting at connection_limit;
        # here the sweep runs from Gateway._serve, and handle_accept makes room instead.
        return bool(self.accepting)

    def handle_accept(self) -> None:
        try:
            accepted = self.accept()
            if accepted is None:
                return
            conn, addr = accepted
            self.set_socket_options(conn)
        except OSError as e:  # the peer left before we got to it, or a bogus socket (as waitress)
            if e.errno in (errno.EMFILE, errno.ENFILE):
                # out of file descriptors (the process's limit is below max_connections, or
                # training holds many): free one, or the listener stays readable and we spin
                self._evict_longest_waiting(self.channels())
            return
        if not self._make_room(peer_of(str(addr[0]))):
            self.counts["refused"] += 1
            _refuse(conn)
            return
        _Channel(self, conn, addr, self.adj, map=self.socket_map)

    def _make_room(self, peer: str) -> bool:
        """True if a connection from `peer` fits, after closing the longest-waiting one in its
        way if a bound is reached; False if every connection in the way is being answered."""
        channels = self.channels()
        mine = [c for c in channels if c.peer == peer]
        if len(mine) >= self.limits.max_connections_per_peer:
            in_the_way = mine
        elif len(channels) >= self.limits.max_connections:
            in_the_way = channels
        else:
            return True
        return self._evict_longest_waiting(in_the_way)

    def _evict_longest_waiting(self, channels: list[_Channel]) -> bool:
        """Close the one of `channels` that has waited longest on its client; False if all of
        them are being answered."""
        waiting = [(since, c) for c in channels if (since := c.waiting_since()) is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda pair: pair[0])[1]
        self.counts["evicted"] += 1
        log.debug("gateway: evicting a waiting connection from %s", oldest.peer)
        oldest.handle_close()  # not being served, so no worker thread holds it
        return True

    def sweep(self, now: float) -> None:
        """Close connections idle for `idle_timeout`, or whose request is still incomplete
        `request_timeout` after its first byte."""
        for channel in self.channels():
            if channel.requests:
                continue  # being answered: its worker thread owns it
            if channel.request is not None and now - channel.request_started > (
                self.limits.request_timeout
            ):
                self.counts["request_timed_out"] += 1
            elif now - channel.last_activity > self.limits.idle_timeout:
                self.counts["idle_closed"] += 1
            else:
                continue
            # Closed here, not flagged `will_close` as waitress's maintenance does: a flagged
            # channel closes when its socket is writable, never if the client stopped reading.
            channel.handle_close()

    def close_everything(self) -> None:
        """Release every socket: connections, the listener and waitress's wake-up pipe."""
        for channel in self.channels():
            channel.handle_close()  # also wakes a worker waiting to write to it
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
        self.close()  # the listening socket and the trigger
        wasyncore.close_all(self.socket_map, ignore_all=True)


def _refuse(conn: socket.socket) -> None:
    """Answer 503 if the socket takes it without waiting, then close. What the client already
    sent is read first, so that the close is a FIN and the 503 is not lost to a reset."""
    try:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.recv(65536)
        conn.send(BUSY)
    except OSError:
        pass
    finally:
        conn.close()


class _BlobApp:
    """The WSGI application: the blob named by `/ipfs/{cid}`, re-hashed before it is sent."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if method not in ("GET", "HEAD"):
            return _error(start_response, "405 Method Not Allowed", "only GET and HEAD",
                          [("Allow", "GET, HEAD")])  # fmt: skip
        path: str = environ.get("PATH_INFO", "")
        if not path.startswith("/ipfs/"):
            return _error(start_response, "404 Not Found", "only /ipfs/{cid} is served")
        try:
            # stored under the canonical (base32) spelling, whatever multibase was asked for
            cid = cid_from_digest(digest_of(path[len("/ipfs/") :].strip("/")))
        except DataError:
            return _error(start_response, "400 Bad Request", "not a raw sha2-256 CID")
        blob = _open_verified(self.store, cid)
        if blob is None:
            return _error(start_response, "404 Not Found", "not here")
        size = blob.seek(0, 2)
        blob.seek(0)
        start_response("200 OK", [
            ("Content-Type", RAW),
            ("Content-Length", str(size)),
            ("Etag", f'"{cid}.raw"'),
            ("X-Ipfs-Path", f"/ipfs/{cid}"),
            ("Cache-Control", "public, max-age=29030400, immutable"),
        ])  # fmt: skip
        if method == "HEAD":
            blob.close()
            return []
        # sent by the event loop from the file, a send buffer at a time; it closes the file
        return cast("Iterable[bytes]", environ["wsgi.file_wrapper"](blob, HASH_CHUNK))


def _open_verified(store: LocalStore, cid: str) -> IO[bytes] | None:
    """The blob's file, open and rewound after its bytes were hashed against `cid` (a corrupted
    file is never served), or None if it is absent or corrupted. Reads in chunks: constant
    memory for any size, and what is sent is the very file that was checked."""
    try:
        blob = open(store.root / cid, "rb")  # noqa: SIM115 (closed by the caller or waitress)
    except OSError:
        return None
    try:
        digest = hashlib.sha256()
        for chunk in _chunks(blob):
            digest.update(chunk)
        if digest.digest() != digest_of(cid):
            log.warning("gateway: %s in %s does not match its hash; not served", cid, store.root)
            blob.close()
            return None
        blob.seek(0)
        return blob
    except OSError:
        blob.close()
        return None


def _chunks(blob: IO[bytes]) -> Iterator[bytes]:
    while chunk := blob.read(HASH_CHUNK):
        yield chunk


def _error(
    start_response: StartResponse,
    status: str,
    message: str,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = (message + "\n").encode()
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    start_response(status, headers + (extra or []))
    return [body]
