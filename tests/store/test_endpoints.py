"""Endpoints cannot forge requests: their shape is fixed, and untrusted ones reach only public
addresses, checked for the address actually connected to.

The canary is a loopback server that records every request: on the old fetcher a voter's fetch
from a registered `http://127.0.0.1:PORT/admin/delete-all?confirm=yes#` reached it with the
registrant's path and query.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest

from covey.errors import ConfigError, DataError
from covey.flock.params import validate_endpoint
from covey.store.cid import cid_for
from covey.store.endpoints import address_refusal, check_endpoint
from covey.store.fetch import FetchLimits, Source, fetch
from tests.store.peers import Peer, answer

BLOB = b"a blob"
CID = cid_for(BLOB)
ONCE = FetchLimits(attempts=1, hedge_s=0.05)

BAD_SHAPES = {
    "http://peer.example/?": "a query",
    "http://peer.example:8091?x=1": "a query",
    "http://peer.example#": "a fragment",
    "http://peer.example/admin/delete-all": "a path",
    "http://peer.example/ipfs": "a path",
    "http://user:secret@peer.example": "user info",
    "http://peer.example@127.0.0.1": "user info",
    "http://peer.example\\@evil.example": "a backslash",
    "http://peer .example": "whitespace",
    "http://peer.example\t": "whitespace",
    "http://peer.example\r\nX-Evil: 1": "whitespace",
    "http://pe\x00er.example": "control",
    "http://péer.example": "non-ASCII",
    "ftp://peer.example": "not an http",
    "file:///etc/passwd": "not an http",
    "gopher://127.0.0.1:25": "not an http",
    "javascript:alert(1)": "not an http",
    "http:/peer.example": "not an http",
    "http://": "no host",
    "http://peer.example:0": "zero port",
    "http://peer.example:99999": "not a URL",
    "http://peer.example:": "empty or zero port",
    "http://0x7f.1": "ambiguous numeric host",
    "http://2130706433": "ambiguous numeric host",
    "http://127.1": "ambiguous numeric host",
    "http://[::1": "not a URL",
    "http://[fe80::1%25eth0]": "malformed IPv6",
    "http://under_score.example": "malformed host name",
    "http://" + "a" * 250 + ".example": "byte limit",
    "": "not an http",
}
GOOD_SHAPES = [
    "http://203.0.113.5:8091",
    "https://peer.example",
    "https://peer.example/",
    "HTTPS://Peer.Example:443",
    "http://[2001:4860:4860::8888]:8080",
    "http://127.0.0.1:9000",  # the shape is fine; the address is refused when fetching
    "http://localhost:9000",
]


@pytest.mark.parametrize(("endpoint", "problem"), BAD_SHAPES.items(), ids=repr)
def test_an_endpoint_is_scheme_host_and_port_only(endpoint: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        check_endpoint(endpoint, "--public-url")
    if endpoint:  # "" means "serves nothing" on chain
        with pytest.raises(ConfigError, match="endpoint"):
            validate_endpoint(endpoint)


@pytest.mark.parametrize("endpoint", GOOD_SHAPES)
def test_endpoints_of_the_right_shape_are_accepted(endpoint: str) -> None:
    assert check_endpoint(endpoint) == endpoint.rstrip("/")
    assert validate_endpoint(endpoint) == endpoint


REFUSED = [
    "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254", "169.254.0.1", "100.64.0.1", "100.127.255.254", "0.0.0.0", "0.1.2.3",
    "224.0.0.1", "224.0.1.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.0.0.9",
    "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9", "192.88.99.1",
    "::", "::1", "fe80::1", "fe80::1%eth0", "febf::1", "fc00::1", "fd12:3456::1", "fec0::1",
    "ff02::1", "ff0e::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
    "::127.0.0.1", "::169.254.169.254", "2002:7f00:1::", "2002:a9fe:a9fe::1",
    "2002:c0a8:101::", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "2001::1",
    "2001:0:4136:e378::1", "2001:db8::1", "3fff::1", "100::1", "5f00::1", "4000::1", "1::1",
]  # fmt: skip
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "203.0.114.1", "100.128.0.1", "172.32.0.1", "2606:4700:4700::1111",
    "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
]  # fmt: skip


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(address), address


@pytest.mark.parametrize("address", PUBLIC)
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert address_refusal(address) is None


# ---------------------------------------------------------------- at connection time


def test_a_peer_endpoint_cannot_reach_loopback_or_forge_a_path() -> None:
    """Each way a registrant can aim a voter's fetch at the voter's own machine: none of
    their requests reaches the canary, and the error says why."""
    with Peer(answer(BLOB)) as canary:
        port = canary.port
        forged = [
            f"http://127.0.0.1:{port}",
            f"http://localhost:{port}",  # a name: refused once resolved, before connecting
            f"http://0.0.0.0:{port}",
            f"http://[::ffff:127.0.0.1]:{port}",
            f"http://[::1]:{port}",
            f"http://127.0.0.1:{port}/admin/delete-all?confirm=yes#",
            f"http://127.0.0.1:{port}/admin/delete-all?confirm=yes&cid=",
            f"http://127.0.0.1:{port}/admin/delete-all#",
        ]
        for endpoint in forged:
            with pytest.raises(DataError) as caught:
                fetch(CID, [endpoint], ONCE)
            assert canary.requests == [], endpoint
            message = str(caught.value)
            assert "refused to connect" in message or "not a usable gateway URL" in message


def test_a_name_is_checked_for_every_address_it_resolves_to() -> None:
    """`localhost` resolves to loopback only: refused at connect time with the addresses."""
    with Peer(answer(BLOB)) as canary:
        with pytest.raises(DataError, match=r"refused to connect to 'localhost': 127\.0\.0\.1"):
            fetch(CID, [f"http://localhost:{canary.port}"], ONCE)
        assert canary.requests == []


def test_the_users_own_gateway_may_be_local_and_keeps_its_host_name() -> None:
    """A gateway the user chose may be on loopback; the connection goes to the resolved
    address and the Host header names the URL's host."""
    with Peer(answer(BLOB)) as gateway:
        url = f"http://localhost:{gateway.port}"
        assert fetch(CID, [Source(url, allow_private=True)], ONCE) == BLOB
        assert [(r.line, r.host) for r in gateway.requests] == [
            (f"GET /ipfs/{CID}?format=raw HTTP/1.1", f"localhost:{gateway.port}")
        ]


def test_a_private_endpoint_allowed_by_the_task_still_cannot_pick_the_path() -> None:
    """allow_private (a LAN task) lifts the address rule only: the request still goes to
    /ipfs/{cid}, never to a query or fragment of the registrant's choosing."""
    with Peer(answer(BLOB)) as canary:
        with pytest.raises(DataError, match="a query"):
            fetch(CID, [Source(f"{canary.url}/admin?x=1#", allow_private=True)], ONCE)
        assert canary.requests == []
        assert fetch(CID, [Source(canary.url, allow_private=True)], ONCE) == BLOB
        assert [r.line.split()[1] for r in canary.requests] == [f"/ipfs/{CID}?format=raw"]


def test_tls_names_the_urls_host_and_verifies_its_certificate(tmp_path: Path) -> None:
    """Over https the handshake carries the URL's host name (SNI) although the socket connects
    to an address; a certificate no CA vouches for is that source's failure."""
    certificate = _self_signed(tmp_path, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))

    def handshake_once() -> None:
        connection, _ = listener.accept()
        with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True):
            pass

    threading.Thread(target=handshake_once, daemon=True).start()
    with listener:
        url = f"https://localhost:{listener.getsockname()[1]}"
        with pytest.raises(DataError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(CID, [Source(url, allow_private=True)], ONCE)
    assert names == ["localhost"]


def _self_signed(folder: Path, host: str) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file
