"""The server's TLS certificate over its lifetime: renewed while running, the operator's own,
configurable names, refusal of an expired one. Real sockets, real handshakes."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from otaguard.crypto import CertificateAuthority
from otaguard.model.errors import ConfigError
from otaguard.server import ServerSettings, start_server_in_thread


def served_certificate(port: int, ca: Path | None) -> x509.Certificate:
    """Handshake with the server (verifying it against ``ca`` when given) and return its cert."""
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()  # noqa: S323
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_ca_certificate_is_renewed_while_the_server_runs(tmp_path: Path) -> None:
    """A server left running must not lock the fleet out when its certificate expires."""
    lifetime = dt.timedelta(seconds=9)
    server = start_server_in_thread(
        ServerSettings(
            data_dir=tmp_path / "srv", repo_dir=None, port=0, server_cert_lifetime=lifetime
        )
    )
    try:
        port = port_of(server.base_url)
        first = served_certificate(port, server.ca_cert)
        assert first.not_valid_after_utc - dt.datetime.now(dt.UTC) <= lifetime
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now_serving = served_certificate(port, server.ca_cert)
            if now_serving.serial_number != first.serial_number:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the server certificate was not renewed")
        # Past the first certificate's expiry, clients still verify the server.
        wait = (first.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() + 1
        time.sleep(max(0.0, wait))
        later = served_certificate(port, server.ca_cert)
        assert later.not_valid_after_utc > dt.datetime.now(dt.UTC)
    finally:
        server.stop()


def test_tls_names_are_in_the_issued_certificate(tmp_path: Path) -> None:
    server = start_server_in_thread(
        ServerSettings(
            data_dir=tmp_path / "srv",
            repo_dir=None,
            port=0,
            tls_names=("updates.example.com", "10.0.0.7"),
        )
    )
    try:
        cert = served_certificate(port_of(server.base_url), server.ca_cert)
    finally:
        server.stop()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "updates.example.com" in san.get_values_for_type(x509.DNSName)
    assert "10.0.0.7" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def _own_certificate(tmp_path: Path, *, valid_for: dt.timedelta) -> tuple[Path, Path, Path]:
    """An operator's certificate from an operator's CA (not the fleet CA)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + valid_for)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp_path / "own.pem", tmp_path / "own.key", tmp_path / "own-ca.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def test_operator_certificate_is_served_and_its_expiry_announced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key, own_ca = _own_certificate(tmp_path, valid_for=dt.timedelta(days=3))
    caplog.set_level(logging.WARNING, logger="otaguard")
    server = start_server_in_thread(
        ServerSettings(data_dir=tmp_path / "srv", repo_dir=None, port=0, tls_cert=cert, tls_key=key)
    )
    try:
        assert server.ca_cert is None  # clients trust the operator's CA, not the fleet CA
        served = served_certificate(port_of(server.base_url), own_ca)
    finally:
        server.stop()
    assert served.serial_number == x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    warnings = [r.getMessage() for r in caplog.records if "expires at" in r.getMessage()]
    assert warnings and str(cert) in warnings[0], "a certificate 3 days from expiry is announced"


def test_expired_operator_certificate_is_refused_at_start(tmp_path: Path) -> None:
    cert, key, _ = _own_certificate(tmp_path, valid_for=dt.timedelta(seconds=-60))
    with pytest.raises(ConfigError, match=r"own\.pem expired at .*devices would refuse it"):
        start_server_in_thread(
            ServerSettings(
                data_dir=tmp_path / "srv", repo_dir=None, port=0, tls_cert=cert, tls_key=key
            )
        )


def test_cli_refuses_a_certificate_without_its_key(tmp_path: Path) -> None:
    cert, _, _ = _own_certificate(tmp_path, valid_for=dt.timedelta(days=30))
    proc = subprocess.run(
        [sys.executable, "-m", "otaguard", "server", "--data", str(tmp_path / "srv"),
         "--tls-cert", str(cert)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "give both a TLS certificate and its key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ca_refuses_to_renew_into_a_foreign_issuer(tmp_path: Path) -> None:
    """A server.pem planted from another CA is replaced, never served."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    cert, key, _ = _own_certificate(tmp_path, valid_for=dt.timedelta(days=30))
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "server.pem").write_bytes(cert.read_bytes())
    (tmp_path / "tls" / "server.key").write_bytes(key.read_bytes())
    creds = ca.server_credentials(tmp_path / "tls", ["127.0.0.1"])
    issued = x509.load_pem_x509_certificate(creds.cert_path.read_bytes())
    assert issued.issuer == ca.certificate.subject


def _handshake(port: int, configure: object) -> str:
    ctx = ssl._create_unverified_context()  # noqa: S323 - the protocol, not the identity, is tested
    configure(ctx)  # type: ignore[operator]
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return str(tls.version())


def test_only_tls13_with_modern_groups(tmp_path: Path) -> None:
    """Mozilla "modern": TLS 1.3 only; key exchange over X25519, P-256 or P-384 only."""
    server = start_server_in_thread(
        ServerSettings(data_dir=tmp_path / "srv", repo_dir=None, port=0)
    )
    try:
        port = port_of(server.base_url)
        assert _handshake(port, lambda c: None) == "TLSv1.3"
        for curve in ("prime256v1", "secp384r1"):
            assert _handshake(port, lambda c, k=curve: c.set_ecdh_curve(k)) == "TLSv1.3"

        def tls12_only(c: ssl.SSLContext) -> None:
            c.maximum_version = ssl.TLSVersion.TLSv1_2

        # uvicorn drops a refused handshake without an alert: the client sees EOF.
        refused = "(?i)protocol version|unsupported protocol|handshake failure|EOF occurred"
        with pytest.raises(ssl.SSLError, match=refused):
            _handshake(port, tls12_only)
        for weak in ("secp521r1", "X448"):
            with pytest.raises(ssl.SSLError, match=refused):
                _handshake(port, lambda c, k=weak: c.set_ecdh_curve(k))
    finally:
        server.stop()


def test_no_session_tickets(tmp_path: Path) -> None:
    """No client resumes a session, so the server issues no TLS 1.3 session tickets (each
    one cost an encryption of the session with the client certificate, per connection)."""
    server = start_server_in_thread(
        ServerSettings(data_dir=tmp_path / "srv", repo_dir=None, port=0)
    )
    try:
        port = port_of(server.base_url)
        ctx = ssl.create_default_context(cafile=str(server.ca_cert))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            # tickets arrive after the handshake: a full request and answer makes sure
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
            session = tls.session
            assert session is None or not session.has_ticket
    finally:
        server.stop()
