"""Moving content-addressed blobs between machines over plain HTTP, as IPFS gateways do.

`Gateway` serves a `LocalStore` following the IPFS trustless-gateway convention: `GET
/ipfs/{cid}` answers the raw bytes of a blob (`application/vnd.ipld.raw`; a raw-codec CID names a
single block, so the block is the file). Nothing is trusted on the way: `fetch` asks each
source in turn, caps the size, times out, retries, and re-hashes what it receives, so a peer
that is down, slow, or serves other bytes costs a bounded wait and a logged reason, never a
crash or a hang. The same `fetch` works against any public IPFS gateway that speaks the
convention (`https://ipfs.io`, a local Kubo node's `http://127.0.0.1:8080`).

Blobs are safetensors or JSON: nothing fetched is ever unpickled.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from covey.errors import DataError
from covey.store.cid import digest_of, verify
from covey.store.local import LocalStore

log = logging.getLogger("covey.store")

RAW = "application/vnd.ipld.raw"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
"""A LoRA adapter of a 7B model at rank 64 is about 320 MB in fp32; Covey's are far smaller."""


class Gateway:
    """An HTTP server that answers `GET /ipfs/{cid}` from `store` (and nothing else)."""

    def __init__(self, store: LocalStore, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        handler = type("Handler", (_Handler,), {"store": store})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where this gateway answers (the bound address; a port of 0 picks a free one)."""
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Gateway:
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="covey-gateway", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    store: LocalStore
    server_version = "covey-gateway"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if not path.startswith("/ipfs/"):
            self.send_error(HTTPStatus.NOT_FOUND, "only /ipfs/{cid} is served")
            return
        cid = path[len("/ipfs/") :].strip("/")
        try:
            digest_of(cid)
        except DataError:
            self.send_error(HTTPStatus.BAD_REQUEST, "not a raw sha2-256 CID")
            return
        try:
            data = self.store.get(cid)  # re-hashed: a corrupted file is never served
        except DataError:
            self.send_error(HTTPStatus.NOT_FOUND, "not here")
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", RAW)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Etag", f'"{cid}.raw"')
        self.send_header("X-Ipfs-Path", f"/ipfs/{cid}")
        self.send_header("Cache-Control", "public, max-age=29030400, immutable")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("gateway %s: " + format, self.address_string(), *args)


def fetch(
    cid: str,
    sources: Sequence[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 30.0,
    attempts: int = 3,
    backoff: float = 1.0,
) -> bytes:
    """The bytes named by `cid` from the first of `sources` (gateway base URLs) that serves them
    intact; DataError listing what each source did when none does.

    Each request waits at most `timeout` seconds; the sources are tried `attempts` times with
    `backoff` seconds (doubling) between passes; more than `max_bytes` is refused unread.
    """
    digest_of(cid)  # a malformed CID fails before any request
    if not sources:
        raise DataError(f"{cid}: no gateway to fetch it from")
    reasons: dict[str, str] = {}
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        for source in dict.fromkeys(s.rstrip("/") for s in sources):
            if not source.startswith(("http://", "https://")):  # peers announce these URLs
                reasons[source] = "not an http(s) URL"
                continue
            try:
                data = _get(f"{source}/ipfs/{cid}?format=raw", max_bytes, timeout)
                verify(cid, data)
                return data
            except DataError as e:
                reasons[source] = str(e)
            except (OSError, urllib.error.URLError, ValueError) as e:  # refused, reset, timeout
                reasons[source] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            log.debug("fetch %s from %s failed: %s", cid, source, reasons[source])
    listed = "; ".join(f"{s}: {r}" for s, r in reasons.items())
    raise DataError(f"{cid}: no source served it intact after {attempts} tries ({listed})")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another http(s) URL (urllib would also follow ftp://)."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if not newurl.startswith(("http://", "https://")):
            raise DataError(f"redirected to a non-http(s) URL {newurl!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects())


def _get(url: str, max_bytes: int, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": RAW})
    with _OPENER.open(request, timeout=timeout) as response:
        declared = response.headers.get("Content-Length")
        if declared is not None and int(declared) > max_bytes:
            raise DataError(f"{declared} bytes is over the {max_bytes}-byte limit")
        data: bytes = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"more than the {max_bytes}-byte limit")
    return data


def check_gateway_url(url: str, what: str) -> str:
    """An http(s) base URL without a trailing slash, or a ConfigError naming `what`."""
    from urllib.parse import urlsplit

    from covey.errors import ConfigError

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{what} {url!r}: expected an http(s):// URL such as http://host:8090")
    return url.strip().rstrip("/")
