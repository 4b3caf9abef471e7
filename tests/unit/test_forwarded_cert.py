"""The forwarded-certificate middleware as an ASGI component (the real nginx is in
tests/integration/test_nginx_proxy.py): who is trusted, what reaches the application."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from otaguard.server._tls import (
    ForwardedClientCert,
    client_certificate_der,
    client_certificate_error,
    client_certificate_proxy,
)

TRUSTED = (ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("fd00::/64"))


def _pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _through(peer: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def app(scope: Any, _receive: Any, _send: Any) -> None:
        seen.update(scope)

    scope = {"type": "http", "client": (peer, 5000), "headers": headers, "extensions": {}}
    asyncio.run(ForwardedClientCert(app, trusted_proxies=TRUSTED)(scope, None, None))
    return seen


def _headers(pem: bytes, verify: bytes = b"SUCCESS") -> list[tuple[bytes, bytes]]:
    return [
        (b"host", b"x"),
        (b"x-client-cert", quote(pem.decode(), safe="").encode()),
        (b"x-client-verify", verify),
    ]


@pytest.mark.parametrize("peer", ["127.0.0.2", "::ffff:127.0.0.2", "fd00::7"])
def test_a_trusted_proxy_forwards_the_certificate(peer: str) -> None:
    pem = _pem()
    scope = _through(peer, _headers(pem))
    assert client_certificate_der(scope) == x509.load_pem_x509_certificate(pem).public_bytes(
        serialization.Encoding.DER
    )
    assert client_certificate_proxy(scope) == peer
    assert client_certificate_error(scope) is None
    assert [k for k, _ in scope["headers"]] == [b"host"]  # the application never sees them


@pytest.mark.parametrize("peer", ["127.0.0.1", "::ffff:127.0.0.1", "10.0.0.2", "not-an-ip"])
def test_anyone_else_is_ignored_and_the_headers_removed(
    peer: str, caplog: pytest.LogCaptureFixture
) -> None:
    scope = _through(peer, _headers(_pem()))
    assert client_certificate_der(scope) is None
    assert client_certificate_proxy(scope) is None
    assert [k for k, _ in scope["headers"]] == [b"host"]
    assert f"ignored a forwarded client certificate header from {peer}" in caplog.text


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        (_headers(_pem(), b"FAILED:certificate has expired"), "did not verify"),
        ([*_headers(_pem()), (b"x-client-cert", b"x")], "several client certificate headers"),
        ([(b"x-client-cert", b"%ZZ"), (b"x-client-verify", b"SUCCESS")], "unreadable"),
        ([(b"x-client-cert", b"A" * 20000), (b"x-client-verify", b"SUCCESS")], "too large"),
    ],
)
def test_what_a_trusted_proxy_forwards_must_be_one_verified_certificate(
    headers: list[tuple[bytes, bytes]], why: str
) -> None:
    scope = _through("127.0.0.2", headers)
    assert client_certificate_der(scope) is None
    error = client_certificate_error(scope)
    assert error is not None and why in error
