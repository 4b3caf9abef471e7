"""Mutual TLS on the device routes: each refusal by direct connection, and renewal."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import World, serial_of, start_world
from otaguard.agent import Device
from otaguard.agent.identity import build_csr, renew_if_due
from otaguard.cli import main
from otaguard.crypto.device_ca import DeviceCA
from otaguard.model.errors import (
    AccessDeniedError,
    InsecureModeWarning,
    NotEnrolledError,
)
from otaguard.model.unsafe import Unsafe
from otaguard.server import ServerSettings, start_server_in_thread
from otaguard.server.client import FleetClient

FILE_KEY = Unsafe.FILE_DEVICE_KEY
TIMESTAMP = "/metadata/timestamp.json"


def fleet(world: World) -> FleetClient:
    return FleetClient(
        server_url=world.server.base_url,
        ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    )


def connect(
    world: World, cert: Path | None = None, key: Path | None = None
) -> http.client.HTTPSConnection:
    url = urlsplit(world.server.base_url)
    assert world.server.ca_cert is not None
    ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def reason(data: bytes) -> str:
    return str(json.loads(data)["error"])


def device_get(world: World, dev: Device, path: str = TIMESTAMP) -> tuple[int, bytes]:
    conn = connect(world, dev.paths.device_cert, dev.paths.device_key)
    try:
        return get(conn, path)
    finally:
        conn.close()


def test_the_app_sees_the_verified_peer_certificate(world: World) -> None:
    dev = world.device("seen")
    status, data = device_get(world, dev, "/api/v1/device/whoami")
    assert status == 200, data
    body = json.loads(data)
    cert = x509.load_pem_x509_certificate(dev.paths.device_cert.read_bytes())
    assert body["serial"] == "seen" and body["status"] == "enrolled"
    assert body["certificate_serial"] == format(cert.serial_number, "x")
    dev.checkin()  # metadata only after a check-in (tests/integration/test_checkin.py)
    assert device_get(world, dev)[0] == 200


def test_the_server_speaks_tls_1_3_only(world: World) -> None:
    url = urlsplit(world.server.base_url)
    assert world.server.ca_cert is not None
    ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)
    with pytest.raises(ssl.SSLError, match=r"UNEXPECTED_EOF|PROTOCOL_VERSION|protocol version"):
        get(conn, "/healthz")
    conn.close()
    conn = connect(world)
    assert get(conn, "/healthz")[0] == 200
    assert conn.sock is not None and conn.sock.version() == "TLSv1.3"
    conn.close()


def test_no_client_certificate_is_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    conn = connect(world)
    with caplog.at_level(logging.WARNING, logger="otaguard"):
        status, data = get(conn, TIMESTAMP)
        assert status == 403
        assert "client certificate is required" in reason(data)
        status, data = get(conn, "/targets/" + "0" * 64 + ".fw.img")
        assert status == 403
    conn.close()
    assert any(
        "client certificate is required" in r.getMessage()
        and "presented subject: none" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


def _foreign_identity(tmp: Path, cn: str) -> tuple[Path, Path]:
    """A certificate for ``cn`` from a CA the server does not know."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "evil.pem", tmp / "evil.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_certificate_from_another_ca_fails_the_handshake(world: World, tmp_path: Path) -> None:
    world.device("victim")
    cert, key = _foreign_identity(tmp_path, "victim")
    conn = connect(world, cert, key)
    # The server aborts the connection: no HTTP answer at all.
    with pytest.raises(http.client.RemoteDisconnected):
        get(conn, TIMESTAMP)
    conn.close()
    # The cause, with the server's own TLS context: the chain does not verify.
    server_ctx = world.server.ssl_context
    assert server_ctx is not None
    assert server_ctx.verify_mode == ssl.CERT_OPTIONAL
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert world.server.ca_cert is not None
    client_ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
    client_ctx.load_cert_chain(str(cert), str(key))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    error: ssl.SSLError | None = None
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                if side is server:
                    error = e
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if error is not None:
            break
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert "unable to get local issuer certificate" in str(error)


def test_a_certificate_the_registry_did_not_issue_is_refused(world: World, tmp_path: Path) -> None:
    dev = world.device("cloned")
    # Even the device CA's own signature is not enough: the registry must have issued it.
    ca = DeviceCA.load_or_create(world.server.data_dir / "device-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_der_x509_csr(build_csr(key, "cloned"))
    cert = ca.issue(
        csr, serial="cloned", hardware_id=dev.config.hardware_id,
        now=dt.datetime.now(dt.UTC), lifetime=dt.timedelta(hours=1),
    )  # fmt: skip
    (tmp_path / "c.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca.issuing.public_bytes(serialization.Encoding.PEM)
    )
    (tmp_path / "c.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    conn = connect(world, tmp_path / "c.pem", tmp_path / "c.key")
    status, data = get(conn, TIMESTAMP)
    conn.close()
    assert status == 403
    assert f"certificate {cert.serial_number:x} was not issued to device cloned" in reason(data)


def test_revocation_takes_effect_on_the_next_request(world: World) -> None:
    dev = world.device("stolen")
    dev.checkin()
    conn = connect(world, dev.paths.device_cert, dev.paths.device_key)
    assert get(conn, TIMESTAMP)[0] == 200
    with fleet(world) as client:
        client.revoke("stolen", "reported stolen")
    status, data = get(conn, TIMESTAMP)  # same keep-alive connection
    conn.close()
    assert status == 403
    assert reason(data) == "access denied: device stolen is revoked: reported stolen"
    with pytest.raises(AccessDeniedError, match="revoked"):
        renew_if_due(
            dev.paths,
            dev.config,
            key_store=FILE_KEY,
            now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=20),
        )


def test_quarantine_takes_effect_on_the_next_request_and_release_ends_it(world: World) -> None:
    dev = world.device("odd")
    dev.checkin()
    conn = connect(world, dev.paths.device_cert, dev.paths.device_key)
    assert get(conn, TIMESTAMP)[0] == 200
    with fleet(world) as client:
        client.quarantine("odd", "odd traffic")
        status, data = get(conn, TIMESTAMP)
        assert status == 403
        assert reason(data) == "access denied: device odd is quarantined: odd traffic"
        # The agent's check-in, before any update check, is refused the same way.
        with pytest.raises(AccessDeniedError, match=r"refused \(HTTP 403\): .*quarantined"):
            dev.check()
        client.release("odd")
    assert get(conn, TIMESTAMP)[0] == 200
    conn.close()


@pytest.fixture
def clocked(tmp_path: Path) -> Iterator[tuple[World, list[dt.timedelta]]]:
    skew = [dt.timedelta(0)]
    w = start_world(tmp_path, clock=lambda: dt.datetime.now(dt.UTC) + skew[0])
    try:
        w.release("1.0.0")
        yield w, skew
    finally:
        w.server.stop()


def test_an_expired_certificate_is_refused_and_cannot_renew(
    clocked: tuple[World, list[dt.timedelta]],
) -> None:
    world, skew = clocked
    dev = world.device("old")
    skew[0] = dt.timedelta(hours=24, minutes=1)
    status, data = device_get(world, dev)
    assert status == 403
    assert "the client certificate of old expired at" in reason(data)
    # Renewal with it is refused by the server too (the device would not even try).
    with pytest.raises(AccessDeniedError, match="expired"):
        renew_if_due(
            dev.paths, dev.config, key_store=FILE_KEY,
            now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=20),
        )  # fmt: skip
    with pytest.raises(NotEnrolledError, match="certificate expired"):
        renew_if_due(
            dev.paths, dev.config, key_store=FILE_KEY,
            now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=25),
        )  # fmt: skip


def test_renewal_when_a_third_of_the_lifetime_is_left(world: World) -> None:
    dev = world.device("renew")
    old = x509.load_pem_x509_certificate(dev.paths.device_cert.read_bytes())
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=10)
    renew_if_due(dev.paths, dev.config, key_store=FILE_KEY, now=soon)
    assert x509.load_pem_x509_certificate(dev.paths.device_cert.read_bytes()) == old
    late = dt.datetime.now(dt.UTC) + dt.timedelta(hours=17)
    renew_if_due(dev.paths, dev.config, key_store=FILE_KEY, now=late)
    new = x509.load_pem_x509_certificate(dev.paths.device_cert.read_bytes())
    assert new.serial_number != old.serial_number
    assert new.public_key() != old.public_key()  # a new key too
    with fleet(world) as client:
        assert client.show("renew").cert_serials == (
            format(old.serial_number, "x"),
            format(new.serial_number, "x"),
        )
    _, data = device_get(world, dev, "/api/v1/device/whoami")
    assert json.loads(data)["certificate_serial"] == format(new.serial_number, "x")


def test_an_unenrolled_device_gets_a_clear_error(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = world.device("fresh", enroll=False)
    with pytest.raises(NotEnrolledError) as info:
        dev.check()
    assert info.value.diagnostics().startswith("not enrolled: run otaguard device enroll")
    assert main(["agent", str(dev.paths.root), "check"]) == 2
    errors = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.strip() and not line.startswith("warning: INSECURE")
    ]
    assert len(errors) == 1
    assert errors[0].startswith("not enrolled: run otaguard device enroll")


def test_insecure_no_client_auth_serves_without_certificates(world: World, tmp_path: Path) -> None:
    world.server.stop()
    with pytest.warns(InsecureModeWarning, match="without client certificates"):
        server = start_server_in_thread(
            ServerSettings(
                data_dir=world.server.data_dir, repo_dir=world.repo.dir, port=0,
                insecure_no_client_auth=True,
            )
        )  # fmt: skip
    with server:
        url = urlsplit(server.base_url)
        assert server.ca_cert is not None
        ctx = ssl.create_default_context(cafile=str(server.ca_cert))
        conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)
        assert get(conn, TIMESTAMP)[0] == 200
        conn.close()


def test_world_devices_are_enrolled(world: World) -> None:
    dev = world.device("a:b")
    assert dev.config.serial == serial_of("a:b") == "a-b"
    assert dev.update().outcome == "up-to-date"


def test_renewal_keeps_the_serial_and_needs_a_certificate(world: World) -> None:
    import base64

    dev = world.device("keep")
    other = ec.generate_private_key(ec.SECP256R1())
    conn = connect(world, dev.paths.device_cert, dev.paths.device_key)
    try:
        conn.request(
            "POST",
            "/.well-known/est/simplereenroll",
            body=base64.encodebytes(build_csr(other, "someone-else")),
            headers={"Content-Type": "application/pkcs10"},
        )
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
    finally:
        conn.close()
    assert status == 422
    assert "CSR subject CN 'someone-else' is not the device serial 'keep'" in reason(data)
    anonymous = connect(world)
    try:
        anonymous.request(
            "POST",
            "/.well-known/est/simplereenroll",
            body=base64.encodebytes(build_csr(other, "keep")),
            headers={"Content-Type": "application/pkcs10"},
        )
        resp = anonymous.getresponse()
        status, data = resp.status, resp.read()
    finally:
        anonymous.close()
    assert status == 403
    assert "client certificate is required" in reason(data)
