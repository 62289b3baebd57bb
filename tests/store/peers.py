"""Hostile and honest peers on loopback, as real TCP servers, for the fetch tests.

`Peer(behaviour)` listens on 127.0.0.1 and runs `behaviour(connection, request)` for each
connection in its own thread, after reading the request head; it records every request (path
and Host header: a "canary" asserts that none reached it) and whether the client hung up on a
connection the behaviour was still writing to (abandoned sources must be closed). Behaviours
give up after `LIFETIME_S`, so a test run against code without deadlines fails, not hangs.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LIFETIME_S = 20.0
"""The longest any hostile behaviour keeps a connection (the old fetcher waited that long)."""

Behaviour = Callable[[socket.socket, "Request"], None]


@dataclass
class Request:
    line: str
    host: str


@dataclass
class Peer:
    behaviour: Behaviour
    requests: list[Request] = field(default_factory=list)
    hung_up: threading.Event = field(default_factory=threading.Event)
    """Set when the client closed a connection while the behaviour still wrote to it."""
    spans: list[tuple[float, float]] = field(default_factory=list)
    """(request read, connection done) times, `time.monotonic()`, of each connection."""

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stopped = False
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(LIFETIME_S)
            head = b""
            try:
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = connection.recv(4096)
                    if not chunk:
                        return
                    head += chunk
            except OSError:
                return
            lines = head.decode("latin-1").split("\r\n")
            hosts = [x.split(":", 1)[1].strip() for x in lines if x.lower().startswith("host:")]
            request = Request(lines[0], hosts[0] if hosts else "")
            self.requests.append(request)
            opened = time.monotonic()
            try:
                self.behaviour(connection, request)
            except (BrokenPipeError, ConnectionResetError):
                self.hung_up.set()
            except OSError:
                pass
            finally:
                self.spans.append((opened, time.monotonic()))

    def stop(self) -> None:
        self._stopped = True
        self.listener.close()
        for c in self._connections:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def answer(data: bytes, status: str = "200 OK", headers: str = "") -> Behaviour:
    """An HTTP/1.1 answer with `data` as the body, all at once."""

    def behaviour(connection: socket.socket, request: Request) -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Length: {len(data)}\r\n{headers}\r\n"
        connection.sendall(head.encode() + data)
        time.sleep(0.2)

    return behaviour


def drip(data: bytes, every_s: float, in_headers: bool = False) -> Behaviour:
    """One byte every `every_s` seconds: of the body (after a 200 declaring all of `data`), or
    of the header section itself, for up to LIFETIME_S."""

    def behaviour(connection: socket.socket, request: Request) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        if in_headers:
            head, data_left = b"", head + data
        else:
            data_left = data
        connection.sendall(head)
        ends = time.monotonic() + LIFETIME_S
        for i in range(len(data_left)):
            if time.monotonic() > ends:
                return
            connection.sendall(data_left[i : i + 1])
            time.sleep(every_s)

    return behaviour


def trickle(data: bytes, bytes_per_s: int) -> Behaviour:
    """The right bytes, slowly: `bytes_per_s` a second in ten pieces a second."""

    def behaviour(connection: socket.socket, request: Request) -> None:
        connection.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        piece = max(1, bytes_per_s // 10)
        for i in range(0, len(data), piece):
            connection.sendall(data[i : i + piece])
            time.sleep(0.1)

    return behaviour


def silent(connection: socket.socket, request: Request) -> None:
    """Accept, read the request, never answer (for up to LIFETIME_S); a client that hangs up
    is noticed (the read returns)."""
    try:
        if connection.recv(1) == b"":
            raise ConnectionResetError
    except TimeoutError:
        pass
