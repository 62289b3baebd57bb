"""Getting content-addressed blobs from peers' gateways, trusting none of them.

`fetch(cid, sources)` asks gateways (base URLs speaking the IPFS trustless-gateway convention,
`GET /ipfs/{cid}`: Covey's `covey.store.gateway.Gateway`, a public IPFS gateway such as
`https://ipfs.io`, a local Kubo node's `http://127.0.0.1:8080`) for the bytes of `cid` and
returns the first answer that hashes to it. Any source may be hostile, so everything it can
make the fetcher spend is bounded (`FetchLimits`):

- time: a wall-clock deadline for the whole blob (`timeout_s`, or the caller's `deadline` if
  earlier) and one for each request to one source (`source_timeout_s`), enforced by a watchdog
  that shuts the socket down, not per read: a server dripping a byte a second, or accepting and
  never answering, is cut off at the deadline. After `grace_s` a source must also keep up
  `min_rate` bytes a second on average, so a drip frees its slot early.
- sources: up to `parallel` at once, one more every `hedge_s` while none has answered (or at
  once when one fails), so a small blob is usually fetched once, and one slow or silent source
  costs `hedge_s`, not its deadline; the first intact answer wins and the others are abandoned
  (their sockets shut down and closed).
- size: `max_bytes`, checked on Content-Length first, then counted.
- where requests go: no redirects (a 3xx is that source's failure), the path is always
  `/ipfs/{cid}`, and each address a host name resolves to is checked
  (`covey.store.endpoints.address_refusal`) before the socket connects to that very address: no
  second DNS lookup between check and connect, so DNS rebinding gains nothing; the Host header
  and TLS SNI carry the URL's host name. Peers' registered endpoints (`Source(url)`) may only
  reach public unicast addresses; gateways the user chose or a LAN task allows
  (`Source(url, allow_private=True)`) may reach any.

Every answer is re-hashed against the CID (`covey.store.cid.verify`); when no source serves it
intact the DataError lists what each source did. Blobs are safetensors or JSON: nothing fetched
is ever unpickled. HTTP(S)_PROXY settings are not used: a proxy would connect to addresses this
module never checked.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import queue
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

from covey.errors import ConfigError, DataError
from covey.store.cid import digest_of, verify
from covey.store.endpoints import address_refusal, check_gateway_url, endpoint_problem
from covey.store.gateway import RAW

__all__ = ["DEFAULT_MAX_BYTES", "FetchLimits", "Source", "check_gateway_url", "fetch"]

log = logging.getLogger("covey.store")

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
"""A LoRA adapter of a 7B model at rank 64 is about 320 MB in fp32; Covey's are far smaller."""

CHUNK = 64 * 1024
RETRY_STATUSES = {404, 408, 429, 500, 502, 503, 504}
"""Answers that may change on a later try (404: the peer does not hold the blob yet)."""


@dataclass(frozen=True)
class FetchLimits:
    """What one `fetch` may cost, whoever the sources are."""

    max_bytes: int = DEFAULT_MAX_BYTES
    """Largest blob accepted (Content-Length checked first, then the bytes counted)."""
    timeout_s: float = 300.0
    """Wall-clock limit for the whole blob: every source, every try (a caller's `deadline` may
    end it sooner)."""
    source_timeout_s: float = 120.0
    """Wall-clock limit for one request to one source, from DNS lookup to the last byte: a
    source must average max_bytes / 120 s (2.2 MB/s for 256 MB; a Covey adapter of a few MB
    needs tens of kB/s)."""
    min_rate: float = 64 * 1024
    """Bytes a second a source must average after `grace_s` (a 0.5 Mbit/s uplink), counted from
    the end of the grace period: a drip or a silent server is cut off soon after it."""
    grace_s: float = 10.0
    """Time a source gets to connect, handshake and start answering before `min_rate` holds."""
    parallel: int = 3
    """Most sources asked at once."""
    hedge_s: float = 2.0
    """While no answer is complete, ask one more source (up to `parallel`) this often; a
    failed source is replaced at once."""
    attempts: int = 2
    """Tries per source when a failure may pass (refused or reset connection, 404 not yet held,
    5xx); a source that ran out of time or fell below `min_rate` has had its chance, and wrong
    bytes, oversize, redirects and refused addresses are not retried either."""
    backoff_s: float = 1.0
    """Wait before a source's second try (doubling after)."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "parallel", "attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fetch {name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_s", "source_timeout_s", "hedge_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"fetch {name} must be > 0, got {getattr(self, name)}")
        for name in ("min_rate", "grace_s", "backoff_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"fetch {name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Source:
    """A gateway base URL and whether it may connect to non-public addresses (a gateway the
    user chose, or a peer in a task that allows private endpoints)."""

    url: str
    allow_private: bool = False


def fetch(
    cid: str,
    sources: Sequence[Source | str],
    limits: FetchLimits = FetchLimits(),
    *,
    deadline: float | None = None,
) -> bytes:
    """The bytes named by `cid` from the first of `sources` that serves them intact, within
    `limits` and before `deadline` (a `time.monotonic()` value) if given; DataError listing
    what each source did when none does. A plain string source is an untrusted peer's
    (`Source(url)`: public addresses only)."""
    digest_of(cid)  # a malformed CID fails before any request
    unique: dict[str, Source] = {}
    for s in sources:
        source = Source(s) if isinstance(s, str) else s
        url = source.url.rstrip("/")
        earlier = unique.get(url)
        unique[url] = Source(url, source.allow_private or bool(earlier and earlier.allow_private))
    if not unique:
        raise DataError(f"{cid}: no gateway to fetch it from")
    return _Fetch(cid, list(unique.values()), limits, deadline).run()


class _Failure(Exception):
    """A source's failure: `reason` for the report, `retry` if a later try may succeed."""

    def __init__(self, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.reason, self.retry = reason, retry


class _Attempt:
    """One request to one source, run by a worker thread; the fetch's loop watches its clock
    and progress and abandons it by shutting its socket down (which wakes a blocked read)."""

    def __init__(self, source: Source, number: int, deadline: float) -> None:
        self.source, self.number, self.deadline = source, number, deadline
        self.started = time.monotonic()
        self.received = 0  # body bytes so far, written by the worker only
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self.abandoned = False

    def watch(self, sock: socket.socket) -> None:
        """Make `sock` the one `abandon` shuts down; refuse it if already abandoned."""
        with self._lock:
            if self.abandoned:
                raise _Failure("abandoned", retry=False)
            self._socket = sock

    def abandon(self) -> None:
        with self._lock:
            self.abandoned = True
            sock = self._socket
        if sock is not None:  # not connected yet, or closed already: nothing to shut down
            with contextlib.suppress(OSError):  # the plain socket's shutdown, also under TLS:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # it wakes a blocked recv

    def time_left(self) -> float:
        """Seconds until this attempt's deadline, for the next socket operation."""
        left = self.deadline - time.monotonic()
        if self.abandoned or left <= 0:
            raise _Failure("abandoned", retry=False)
        return left


@cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _Fetch:
    """The scheduling loop of one `fetch`: starts attempts, watches them, takes the first
    intact answer."""

    def __init__(
        self, cid: str, sources: list[Source], limits: FetchLimits, deadline: float | None
    ) -> None:
        self.cid, self.limits = cid, limits
        self.started = time.monotonic()
        self.end = self.started + limits.timeout_s
        if deadline is not None:
            self.end = min(self.end, deadline)
        # (time it may start, place in the caller's order, source, try number)
        self.pending: list[tuple[float, int, Source, int]] = [
            (self.started, i, s, 1) for i, s in enumerate(sources)
        ]
        self.order = {s.url: i for i, s in enumerate(sources)}
        self.running: list[_Attempt] = []
        self.results: queue.Queue[tuple[_Attempt, bytes | None, _Failure | None]] = queue.Queue()
        self.reasons: dict[str, list[str]] = {s.url: [] for s in sources}

    def run(self) -> bytes:
        try:
            return self._loop()
        finally:
            for attempt in self.running:  # abandoned: the winner is in, or time is up
                attempt.abandon()

    def _loop(self) -> bytes:
        while True:
            now = time.monotonic()
            if now >= self.end:
                for attempt in list(self.running):
                    self._fail(attempt, "still unanswered when the fetch's time ran out", False)
                raise self._error(timed_out=True)
            self._start_attempts(now)
            if not self.running and not self.pending:
                raise self._error(timed_out=False)
            self._enforce_limits(now)
            try:
                attempt, data, failure = self.results.get(timeout=self._next_event(now))
            except queue.Empty:
                continue
            if attempt not in self.running:
                continue  # abandoned by the watchdog: its reason is recorded already
            self.running.remove(attempt)
            if data is not None:
                return data
            assert failure is not None
            self._fail(attempt, failure.reason, failure.retry)

    def _start_attempts(self, now: float) -> None:
        hedged = 1 + int((now - self.started) / self.limits.hedge_s)
        while len(self.running) < min(self.limits.parallel, hedged):
            ready = [p for p in self.pending if p[0] <= now]
            if not ready:
                return
            item = min(ready, key=lambda p: (p[3], p[1]))  # first tries first, in order
            self.pending.remove(item)
            _, _, source, number = item
            deadline = min(now + self.limits.source_timeout_s, self.end)
            attempt = _Attempt(source, number, deadline)
            self.running.append(attempt)
            threading.Thread(
                target=self._work, args=(attempt,), name="covey-fetch", daemon=True
            ).start()

    def _enforce_limits(self, now: float) -> None:
        """The watchdog: abandon attempts past their deadline or below the minimum rate."""
        limits = self.limits
        for attempt in list(self.running):
            elapsed = now - attempt.started
            if now >= attempt.deadline:
                self._fail(
                    attempt,
                    f"timed out: no complete answer within {elapsed:.1f} s "
                    f"({attempt.received} bytes)",
                    retry=False,
                )
            elif now >= self._too_slow_at(attempt):
                self._fail(
                    attempt,
                    f"too slow: {attempt.received} bytes in {elapsed:.1f} s (at least "
                    f"{limits.min_rate:.0f} bytes/s after the first {limits.grace_s:g} s)",
                    retry=False,
                )

    def _too_slow_at(self, attempt: _Attempt) -> float:
        if self.limits.min_rate <= 0:
            return math.inf
        return attempt.started + self.limits.grace_s + attempt.received / self.limits.min_rate

    def _next_event(self, now: float) -> float:
        """Seconds until the loop must look again if no result comes in first."""
        events = [self.end]
        for attempt in self.running:
            events += [attempt.deadline, self._too_slow_at(attempt)]
        if self.pending:  # a retry's wait ending; a ready source waits for a hedge or a result
            events += [p[0] for p in self.pending if p[0] > now]
            if len(self.running) < self.limits.parallel:
                hedges = int((now - self.started) / self.limits.hedge_s) + 1
                events.append(self.started + hedges * self.limits.hedge_s)
        # a received byte moves the too-slow time later: look again at least once a second
        return max(0.001, min(min(events) - now, 1.0))

    def _fail(self, attempt: _Attempt, reason: str, retry: bool) -> None:
        if attempt in self.running:
            self.running.remove(attempt)
        attempt.abandon()
        url = attempt.source.url
        self.reasons[url].append(reason)
        log.debug("fetch %s from %s failed: %s", self.cid, url, reason)
        if retry and attempt.number < self.limits.attempts:
            wait = self.limits.backoff_s * 2 ** (attempt.number - 1)
            self.pending.append(
                (time.monotonic() + wait, self.order[url], attempt.source, attempt.number + 1)
            )

    def _error(self, timed_out: bool) -> DataError:
        elapsed = time.monotonic() - self.started
        listed = "; ".join(
            f"{url}: {' / '.join(dict.fromkeys(reasons)) or 'not asked before the deadline'}"
            for url, reasons in self.reasons.items()
        )
        why = "before its deadline" if timed_out else "in"
        return DataError(f"{self.cid}: no source served it intact {why} {elapsed:.1f} s ({listed})")

    def _work(self, attempt: _Attempt) -> None:
        try:
            data = _download(attempt, self.cid, self.limits.max_bytes)
        except _Failure as failure:
            self.results.put((attempt, None, failure))
        except DataError as e:  # the bytes do not hash to the CID
            self.results.put((attempt, None, _Failure(str(e), retry=False)))
        except (OSError, http.client.HTTPException, ValueError) as e:  # refused, reset, TLS
            reason = f"{type(e).__name__}: {e}"
            self.results.put((attempt, None, _Failure(reason, retry=True)))
        except Exception as e:  # a parser's surprise must not leave the slot hanging
            self.results.put((attempt, None, _Failure(f"{type(e).__name__}: {e}", retry=False)))
        else:
            self.results.put((attempt, data, None))


def _download(attempt: _Attempt, cid: str, max_bytes: int) -> bytes:
    """GET `/ipfs/{cid}` from `attempt`'s source; the verified bytes, or an exception."""
    source = attempt.source
    problem = _gateway_problem(source.url) if source.allow_private else endpoint_problem(source.url)
    if problem:
        raise _Failure(f"not a usable gateway URL: {problem}", retry=False)
    parts = urlsplit(source.url)
    https = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    sock = _connect(attempt, host, port)
    connection: http.client.HTTPConnection | None = None
    response: http.client.HTTPResponse | None = None
    try:
        if https:
            sock = _context_wrap(attempt, sock, host)
        connection = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
            host, port
        )
        connection.sock = sock  # already connected to the checked address: no new lookup
        sock.settimeout(attempt.time_left())
        path = f"{parts.path.rstrip('/')}/ipfs/{cid}?format=raw"
        connection.request("GET", path, headers={"Accept": RAW, "User-Agent": "covey-fetch"})
        sock.settimeout(attempt.time_left())
        response = connection.getresponse()
        _check_status(response)
        declared = _content_length(response, max_bytes)
        chunks = []
        while True:
            sock.settimeout(attempt.time_left())
            chunk = response.read1(CHUNK)
            if not chunk:
                break
            attempt.received += len(chunk)
            if attempt.received > max_bytes:
                raise _Failure(f"sent more than the {max_bytes}-byte limit", retry=False)
            chunks.append(chunk)
        if attempt.abandoned:
            raise _Failure("abandoned", retry=False)
        if declared is not None and attempt.received < declared:
            raise _Failure(f"closed after {attempt.received} of {declared} bytes", retry=True)
        data = b"".join(chunks)
        verify(cid, data)
        return data
    finally:  # the response holds the socket's file: close it too, or the socket stays open
        if response is not None:
            response.close()
        if connection is not None:
            connection.close()
        sock.close()


def _gateway_problem(url: str) -> str | None:
    try:
        check_gateway_url(url, "gateway")
    except ConfigError as e:
        return str(e)
    return None


def _connect(attempt: _Attempt, host: str, port: int) -> socket.socket:
    """A TCP connection to an address of `host` that the source's policy allows, connecting to
    exactly the address that was checked."""
    try:  # blocking; a lookup that hangs is abandoned by the watchdog
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise _Failure(f"cannot resolve {host!r}: {e}", retry=True) from None
    problems: list[str] = []
    connectable = 0
    for family, kind, proto, _, sockaddr in dict.fromkeys(
        (f, k, p, "", a) for f, k, p, _, a in infos
    ):
        address = str(sockaddr[0])
        if not attempt.source.allow_private:
            why = address_refusal(address)
            if why:
                problems.append(f"{address} is {why}")
                continue
        connectable += 1
        sock = socket.socket(family, kind, proto)
        try:
            attempt.watch(sock)
            sock.settimeout(attempt.time_left())
            sock.connect(sockaddr)
            return sock
        except (OSError, _Failure) as e:
            sock.close()
            if isinstance(e, _Failure):
                raise
            problems.append(f"{address}: {type(e).__name__}: {e}")
    if not connectable:
        raise _Failure(
            f"refused to connect to {host!r}: {'; '.join(problems)} (a peer's endpoint must be "
            "a public address; a LAN task sets flock.allow_private_endpoints)",
            retry=False,
        )
    raise _Failure("; ".join(problems), retry=True)


def _context_wrap(attempt: _Attempt, sock: socket.socket, host: str) -> ssl.SSLSocket:
    """TLS over the connected socket, with the URL's host name for SNI and the certificate."""
    tls = _tls_context().wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        attempt.watch(tls)
        tls.settimeout(attempt.time_left())
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


def _check_status(response: http.client.HTTPResponse) -> None:
    if response.status == 200:
        return
    if 300 <= response.status < 400:
        location = (response.getheader("Location") or "")[:200]
        raise _Failure(
            f"answered HTTP {response.status} redirecting to {location!r}; redirects are not "
            "followed (a peer could point the fetcher anywhere)",
            retry=False,
        )
    raise _Failure(f"HTTP {response.status}", retry=response.status in RETRY_STATUSES)


def _content_length(response: http.client.HTTPResponse, max_bytes: int) -> int | None:
    values = response.msg.get_all("Content-Length") or []
    if not values:
        return None
    if len(set(values)) != 1 or not values[0].strip().isdigit():
        raise _Failure(f"malformed Content-Length {values[:3]!r}", retry=False)
    declared = int(values[0])
    if declared > max_bytes:
        raise _Failure(f"declared {declared} bytes, over the {max_bytes}-byte limit", retry=False)
    return declared
