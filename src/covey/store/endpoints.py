"""Which URLs a fetcher may be sent to, and which addresses it may connect to.

A FLock participant registers on chain the base URL where its gateway serves blobs, and every
other participant then sends `GET {endpoint}/ipfs/{cid}` there. Unchecked, that hands every
registrant a request-forgery channel into its peers' networks: an endpoint of
`http://169.254.169.254` (a cloud's metadata service), `http://[::1]:8080` or `localhost` makes
each voter's machine send requests to itself; one ending in `?` or `#` swallows the
`/ipfs/{cid}` suffix, so the registrant picks the path and the query
(`http://127.0.0.1:9000/admin/delete-all?confirm=yes#`). Two checks close it:

- `check_endpoint` (shape, when an endpoint is registered or read): an http(s) scheme, a host
  and an optional port, nothing else: no path but "/", no query, fragment or user info, printable
  ASCII only, at most `MAX_ENDPOINT_BYTES`. Every request then goes to `/ipfs/{cid}` of that host.
- `address_refusal` (address, at connection time, for the address actually connected to, so a
  name that resolves differently later, DNS rebinding, gains nothing): only public unicast
  addresses, unless the task allows private ones (a LAN or loopback network such as the
  devnet). Python's `ipaddress.is_global` alone is not enough: on 3.11 it calls multicast
  `224.0.1.1`, `192.0.0.9`, site-local `fec0::1`, and the 6to4 (`2002:7f00:1::`) and NAT64
  (`64:ff9b::7f00:1`) forms of 127.0.0.1 global, so the ranges are listed here explicitly (IANA's
  special-purpose registries), and embedded IPv4 addresses are judged as IPv4.

Gateways a user names on the command line (`--gateway`) are the user's own choice: they get the
looser `check_gateway_url` (a path prefix is allowed) and any address.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

from covey.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_ENDPOINT_BYTES = 256
"""The contract keeps at most 256 bytes of endpoint."""

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PRINTABLE_ASCII = re.compile(r"^[\x21-\x7e]*$")

_IPV4_REFUSED = {
    ipaddress.ip_network(net): why
    for net, why in [
        ("0.0.0.0/8", "'this network' (0.0.0.0 reaches the local host)"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT (shared address space)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata services live at 169.254.169.254)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (and broadcast)"),
    ]
}
_IPV6_REFUSED = {
    ipaddress.ip_network(net): why
    for net, why in [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments (Teredo and others)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    ]
}
_IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


def address_refusal(address: IPAddress | str) -> str | None:
    """Why `address` is not a public unicast address (None when it is one): what a fetch from
    an untrusted endpoint may connect to. IPv4 addresses inside IPv6 (IPv4-mapped, 6to4, NAT64)
    are judged as the IPv4 address they carry."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded, form = _embedded_ipv4(ip)
        if embedded is not None:
            why = address_refusal(embedded)
            return f"{form} form of {embedded}: {why}" if why else None
        for net, why in _IPV6_REFUSED.items():
            if ip in net:
                return why
        if ip not in _IPV6_GLOBAL_UNICAST:
            return "reserved (outside 2000::/3, IPv6's global unicast space)"
        return None
    for net, why in _IPV4_REFUSED.items():
        if ip in net:
            return why
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address | None, str]:
    if ip in _IPV4_MAPPED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "IPv4-mapped"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF), "6to4"
    return None, ""


def endpoint_problem(endpoint: str) -> str | None:
    """What is wrong with `endpoint` as a registered blob endpoint (None: nothing)."""
    problem = _url_problem(endpoint)
    if problem:
        return problem
    path = urlsplit(endpoint).path
    if path not in ("", "/"):
        return (
            f"has a path ({path!r}); an endpoint is scheme://host[:port] only, and blobs are "
            "fetched from its /ipfs/{cid}"
        )
    return None


def check_endpoint(endpoint: str, what: str = "endpoint") -> str:
    """`endpoint` without a trailing slash, or a ConfigError naming `what` and the problem."""
    problem = endpoint_problem(endpoint)
    if problem:
        raise ConfigError(
            f"{what} {endpoint[:300]!r}: {problem}; expected http(s)://host[:port] "
            "such as http://203.0.113.5:8091"
        )
    return endpoint.rstrip("/")


def check_gateway_url(url: str, what: str) -> str:
    """A gateway the user chose (`--gateway`): like an endpoint, but a path prefix is allowed
    (a gateway behind a reverse proxy); without a trailing slash, or a ConfigError naming
    `what`. Surrounding whitespace is stripped (a pasted URL)."""
    url = url.strip()
    problem = _url_problem(url)
    if problem:
        raise ConfigError(
            f"{what} {url[:300]!r}: {problem}; expected an http(s):// URL such as http://host:8090"
        )
    return url.rstrip("/")


def _url_problem(url: str) -> str | None:
    """The checks endpoints and gateways share: everything but the path."""
    if len(url.encode()) > MAX_ENDPOINT_BYTES:
        return f"is {len(url.encode())} bytes, over the {MAX_ENDPOINT_BYTES}-byte limit"
    if not _PRINTABLE_ASCII.match(url):
        return (
            "holds whitespace, control or non-ASCII characters (write an internationalised "
            "host name in its xn-- form)"
        )
    for char, name in (("?", "a query"), ("#", "a fragment"), ("\\", "a backslash")):
        if char in url:
            return f"has {name} ({char!r})"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not 0..65535)
    except ValueError as e:
        return f"is not a URL ({e})"
    if parts.scheme not in ("http", "https") or not url.lower().startswith(parts.scheme + "://"):
        return "is not an http:// or https:// URL"
    if "@" in parts.netloc:
        return "has user info ('@'); credentials never go in an endpoint"
    return _host_problem(parts)


def _host_problem(parts: SplitResult) -> str | None:
    host, netloc = parts.hostname or "", parts.netloc
    if not host:
        return "has no host"
    if parts.port == 0 or netloc.endswith(":"):
        return "has an empty or zero port"
    if netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"has a malformed IPv6 address {host!r}"
        if "%" in host:
            return f"has a malformed IPv6 address {host!r} (a zone id means nothing to peers)"
        return None
    labels = host.rstrip(".").split(".")
    if not all(_LABEL.match(label) for label in labels) or len(host) > 253:
        return f"has a malformed host name {host!r} (letters, digits, '-' and '.' only)"
    if labels[-1].isdigit():  # an IPv4 address: dotted quad only, not 0x7f.1 or 2130706433
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"has an ambiguous numeric host {host!r} (write IPv4 as a.b.c.d)"
    return None
