"""Serving content-addressed blobs over plain HTTP, as IPFS gateways do.

`Gateway` serves a `LocalStore` following the IPFS trustless-gateway convention: `GET
/ipfs/{cid}` answers the raw bytes of a blob (`application/vnd.ipld.raw`; a raw-codec CID names a
single block, so the block is the file). The client side, `covey.store.fetch`, gets blobs back
from such gateways (Covey's own or any public IPFS gateway) and re-hashes them.
"""

from __future__ import annotations

import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from covey.errors import DataError
from covey.store.cid import digest_of
from covey.store.local import LocalStore

log = logging.getLogger("covey.store")

RAW = "application/vnd.ipld.raw"


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
