"""Getting content-addressed blobs from peers' gateways, trusting none of them.

`fetch` asks each source (a gateway base URL speaking the IPFS trustless-gateway convention,
`GET /ipfs/{cid}`: Covey's `covey.store.gateway.Gateway`, a public IPFS gateway such as
`https://ipfs.io`, a local Kubo node's `http://127.0.0.1:8080`) in turn, caps the size, times
out, retries, and re-hashes what it receives, so a peer that is down, slow, or serves other
bytes costs a bounded wait and a logged reason, never a crash or a hang.

Blobs are safetensors or JSON: nothing fetched is ever unpickled.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from covey.errors import DataError
from covey.store.cid import digest_of, verify
from covey.store.gateway import RAW

log = logging.getLogger("covey.store")

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
"""A LoRA adapter of a 7B model at rank 64 is about 320 MB in fp32; Covey's are far smaller."""


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
