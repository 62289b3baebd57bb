"""Blobs over HTTP: a real gateway on loopback, fetches that verify, cap, time out and retry."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from covey.errors import ConfigError, DataError
from covey.store.cid import cid_for
from covey.store.fetch import FetchLimits, Source, check_gateway_url, fetch
from covey.store.gateway import Gateway
from covey.store.local import LocalStore


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with Gateway(LocalStore(tmp_path / "store")) as g:
        yield g


def own(*urls: str) -> list[Source]:
    """Gateways the user chose: loopback is allowed for them."""
    return [Source(u, allow_private=True) for u in urls]


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[str, ThreadingHTTPServer]:
    """A misbehaving peer on loopback."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_a_published_blob_is_served_raw_and_fetched_intact(gateway: Gateway) -> None:
    cid = gateway.store.put(b"adapter bytes")
    with urllib.request.urlopen(f"{gateway.url}/ipfs/{cid}") as response:
        assert response.headers["Content-Type"] == "application/vnd.ipld.raw"
        assert response.headers["X-Ipfs-Path"] == f"/ipfs/{cid}"
        assert response.read() == b"adapter bytes"
    assert fetch(cid, own(gateway.url)) == b"adapter bytes"


@pytest.mark.parametrize(
    ("path", "status"),
    [("/ipfs/" + cid_for(b"absent"), 404), ("/ipfs/not-a-cid", 400), ("/etc/passwd", 404)],
)
def test_only_stored_blobs_are_served(gateway: Gateway, path: str, status: int) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(gateway.url + path)
    assert caught.value.code == status


def test_a_corrupted_file_is_never_served(gateway: Gateway) -> None:
    cid = gateway.store.put(b"good")
    (gateway.store.root / cid).write_bytes(b"evil")
    with pytest.raises(DataError, match="no source served it intact"):
        fetch(cid, own(gateway.url), FetchLimits(attempts=1))


def test_wrong_bytes_from_one_peer_fall_back_to_the_next(gateway: Gateway) -> None:
    cid = gateway.store.put(b"the real update")

    class Liar(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"a substituted update")

        def log_message(self, *args: object) -> None:
            pass

    liar, server = serve(Liar)
    try:
        assert fetch(cid, own(liar, gateway.url), FetchLimits(attempts=1)) == b"the real update"
        with pytest.raises(DataError, match=r"do not match their content hash"):
            fetch(cid, own(liar), FetchLimits(attempts=1))
    finally:
        server.shutdown()


def test_oversized_slow_and_dead_peers_cost_a_bounded_wait(gateway: Gateway) -> None:
    cid = cid_for(b"x" * 100)

    class Flood(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 10_000)

        def log_message(self, *args: object) -> None:
            pass

    class Silent(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(5)

        def log_message(self, *args: object) -> None:
            pass

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    flood, flood_server = serve(Flood)
    silent, silent_server = serve(Silent)
    try:
        started = time.monotonic()
        with pytest.raises(DataError) as caught:
            limits = FetchLimits(max_bytes=1000, source_timeout_s=0.5, attempts=2, backoff_s=0.1)
            fetch(cid, own(flood, silent, dead), limits)
        assert time.monotonic() - started < 4
        message = str(caught.value)
        assert "1000-byte limit" in message and "timed out" in message, message
        assert "Connection refused" in message or "ConnectionRefused" in message
    finally:
        flood_server.shutdown()
        silent_server.shutdown()


def test_a_peer_cannot_point_the_fetcher_at_local_files(gateway: Gateway) -> None:
    cid = cid_for(b"secret")
    for source in ("file:///etc", Source("file:///etc", allow_private=True)):
        with pytest.raises(DataError, match="not an http"):
            fetch(cid, [source], FetchLimits(attempts=1))


def test_gateway_urls_are_checked() -> None:
    assert check_gateway_url("http://10.0.0.2:8090/", "--public-url") == "http://10.0.0.2:8090"
    assert check_gateway_url(" https://gw.example/prefix/ ", "--gateway") == (
        "https://gw.example/prefix"
    )
    with pytest.raises(ConfigError, match="--public-url 'ftp://x'"):
        check_gateway_url("ftp://x", "--public-url")
    for bad in ("http://gw.example/?x=1", "http://gw.example/#", "http://user:pw@gw.example"):
        with pytest.raises(ConfigError, match="--gateway"):
            check_gateway_url(bad, "--gateway")
