"""Certificates and SuperNode keys: valid for the hosts asked, private keys owner-only."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from covey.flower.certs import make_certificates, make_node_key
from tests.flock.test_keys import no_chmod, owner_only  # noqa: F401 - no_chmod is a fixture


@pytest.mark.usefixtures("no_chmod")
def test_private_keys_are_owner_only_from_creation(tmp_path: Path) -> None:
    """The SuperLink's TLS key and a SuperNode's key are never readable by others, not even
    between writing and a chmod (which `no_chmod` makes fail)."""
    files = make_certificates(tmp_path / "certs", ["10.0.0.5", "superlink.example.org"])
    private, public = make_node_key(tmp_path / "keys", "client-3")
    assert owner_only(files.key) and owner_only(private)
    assert b"PRIVATE KEY" in files.key.read_bytes() and b"PRIVATE KEY" in private.read_bytes()
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_certificate_names_the_hosts(tmp_path: Path) -> None:
    from cryptography import x509

    files = make_certificates(tmp_path, ["10.0.0.5", "superlink.example.org", "127.0.0.1"])
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
