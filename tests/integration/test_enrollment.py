"""Device CA, registry, enrollment tokens and EST enrollment against a real HTTPS server."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import HW, World, start_world
from db_support import ENGINES
from otaguard.agent.identity import build_csr
from otaguard.model.errors import (
    AccessDeniedError,
    DeviceExistsError,
    InsecureModeWarning,
    OperatorError,
    UnknownDeviceError,
)
from otaguard.model.unsafe import Unsafe
from otaguard.server.client import FleetClient

FILE_KEY = Unsafe.FILE_DEVICE_KEY


def fleet(world: World) -> FleetClient:
    return FleetClient(
        server_url=world.server.base_url,
        ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    )


def est_post(
    world: World, serial: str, token: str | None, body: bytes, path: str = "simpleenroll"
) -> tuple[int, bytes]:
    """POST to the EST endpoint by hand (real socket, server-authenticated TLS)."""
    url = urlsplit(world.server.base_url)
    assert world.server.ca_cert is not None
    ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)
    headers = {"Content-Type": "application/pkcs10"}
    if token is not None:
        headers["Authorization"] = (
            "Basic " + base64.b64encode(f"{serial}:{token}".encode()).decode()
        )
    try:
        conn.request("POST", f"/.well-known/est/{path}", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def reason(data: bytes) -> str:
    return str(json.loads(data)["error"])


def csr_b64(key: ec.EllipticCurvePrivateKey, cn: str) -> bytes:
    return base64.encodebytes(build_csr(key, cn))


def test_enrollment_issues_a_certificate_from_the_registry(world: World) -> None:
    with fleet(world) as client:
        new = client.add_device("dev-1", HW)
    assert new.device.status == "registered"
    assert len(new.token) >= 22  # >= 128 bits, URL-safe base64
    assert new.token_expires - dt.datetime.now(dt.UTC) > dt.timedelta(hours=23)
    assert new.token not in repr(new)
    dev = world.device("dev-1", enroll=False)
    with pytest.warns(InsecureModeWarning, match="identity key in a file"):
        cert = dev.enroll(new.token, key_store=FILE_KEY)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:otaguard:hw:{HW}"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(hours=24) <= life <= dt.timedelta(hours=24, minutes=6)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert stat.S_IMODE(dev.paths.device_key.stat().st_mode) == 0o600
    chain = x509.load_pem_x509_certificates(dev.paths.device_cert.read_bytes())
    assert chain[0] == cert and chain[1].subject == cert.issuer
    with fleet(world) as client:
        shown = client.show("dev-1")
    assert shown.status == "enrolled"
    assert shown.cert_serials == (format(cert.serial_number, "x"),)
    # The token hash only, never the token, is in the database.
    db = (world.server.data_dir / "otaguard.db").read_bytes()
    assert new.token.encode() not in db


def test_device_ca_files(world: World) -> None:
    ca_dir = world.server.data_dir / "device-ca"
    for key in ("root.key", "issuing.key"):
        assert stat.S_IMODE((ca_dir / key).stat().st_mode) == 0o600
    root = x509.load_pem_x509_certificate((ca_dir / "root.pem").read_bytes())
    issuing = x509.load_pem_x509_certificate((ca_dir / "issuing.pem").read_bytes())
    assert root.issuer == root.subject and issuing.issuer == root.subject
    issuing.verify_directly_issued_by(root)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_a_used_token_is_refused(world: World) -> None:
    with fleet(world) as client:
        token = client.add_device("once", HW).token
    dev = world.device("once", enroll=False)
    dev.enroll(token, key_store=FILE_KEY)
    with pytest.raises(AccessDeniedError, match="enrollment token was already used"):
        dev.enroll(token, key_store=FILE_KEY)


def test_a_token_for_another_serial_is_refused(world: World) -> None:
    with fleet(world) as client:
        token_a = client.add_device("dev-a", HW).token
        client.add_device("dev-b", HW)
    dev_b = world.device("dev-b", enroll=False)
    with pytest.raises(AccessDeniedError, match="token is not for device 'dev-b'"):
        dev_b.enroll(token_a, key_store=FILE_KEY)
    # Still usable by its own device.
    world.device("dev-a", enroll=False).enroll(token_a, key_store=FILE_KEY)


def test_an_unknown_token_is_refused(world: World) -> None:
    with fleet(world) as client:
        client.add_device("dev-u", HW)
    with pytest.raises(AccessDeniedError, match="unknown enrollment token"):
        world.device("dev-u", enroll=False).enroll("x" * 43, key_store=FILE_KEY)


@pytest.fixture
def clocked(tmp_path: Path) -> Iterator[tuple[World, list[dt.timedelta]]]:
    """A world whose server clock can be moved forward."""
    skew = [dt.timedelta(0)]
    w = start_world(tmp_path, clock=lambda: dt.datetime.now(dt.UTC) + skew[0])
    try:
        w.release("1.0.0")
        yield w, skew
    finally:
        w.server.stop()


def test_an_expired_token_is_refused(clocked: tuple[World, list[dt.timedelta]]) -> None:
    world, skew = clocked
    with fleet(world) as client:
        token = client.add_device("late", HW).token
    skew[0] = dt.timedelta(hours=24, seconds=1)
    with pytest.raises(AccessDeniedError, match="enrollment token has expired"):
        world.device("late", enroll=False).enroll(token, key_store=FILE_KEY)


def test_a_bad_csr_signature_is_refused_and_the_token_kept(world: World) -> None:
    with fleet(world) as client:
        token = client.add_device("pop", HW).token
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(build_csr(key, "pop"))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    status, data = est_post(world, "pop", token, base64.encodebytes(bytes(der)))
    assert status == 422
    assert "CSR signature does not verify" in reason(data)
    # The refused request did not use the token up.
    status, data = est_post(world, "pop", token, csr_b64(key, "pop"))
    assert status == 200, data


def test_a_csr_for_another_name_is_refused(world: World) -> None:
    with fleet(world) as client:
        token = client.add_device("me", HW).token
    key = ec.generate_private_key(ec.SECP256R1())
    status, data = est_post(world, "me", token, csr_b64(key, "someone-else"))
    assert status == 422
    assert "CSR subject CN 'someone-else' is not the device serial 'me'" in reason(data)


def test_a_csr_with_another_key_type_is_refused(world: World) -> None:
    with fleet(world) as client:
        token = client.add_device("p384", HW).token
    key = ec.generate_private_key(ec.SECP384R1())
    status, data = est_post(world, "p384", token, csr_b64(key, "p384"))
    assert status == 422
    assert "CSR key must be EC P-256" in reason(data)


def test_garbage_and_missing_credentials_are_refused(world: World) -> None:
    with fleet(world) as client:
        token = client.add_device("junk", HW).token
    status, data = est_post(world, "junk", token, b"not base64!")
    assert (status, reason(data)) == (422, "verification failed: the CSR is not base64")
    status, data = est_post(world, "junk", token, base64.b64encode(b"not a csr"))
    assert "not a DER PKCS#10 CSR" in reason(data)
    status, data = est_post(world, "junk", None, b"")
    assert status == 401
    assert "HTTP Basic" in reason(data)


def test_the_hardware_id_comes_from_the_registry_not_the_csr(world: World) -> None:
    with fleet(world) as client:
        token = client.add_device("hw", HW).token
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hw")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:otaguard:hw:other-hw")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
    status, data = est_post(world, "hw", token, body)
    assert status == 200
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(data))
    # the device's certificate, not the CA's: PKCS#7 holds them as a SET, in DER order
    (leaf,) = [c for c in certs if c.public_key() == key.public_key()]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:otaguard:hw:{HW}"]


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_a_revoked_device_cannot_enroll(world: World) -> None:
    with fleet(world) as client:
        token = client.add_device("gone", HW).token
        client.revoke("gone", "stolen")
        with pytest.raises(OperatorError, match="revoked"):
            client.new_token("gone")
    with pytest.raises(AccessDeniedError, match="enrollment token was already used"):
        world.device("gone", enroll=False).enroll(token, key_store=FILE_KEY)


def test_a_revoked_device_with_a_fresh_token_row_cannot_enroll(world: World) -> None:
    """The revoked check stands on its own, not only on revocation spending the tokens."""
    from otaguard.server.fleet import hash_token
    from otaguard.server.storage.base import DeviceState

    with fleet(world) as client:
        client.add_device("gone2", HW)
    store = world.server.app.state.devices
    now = dt.datetime.now(dt.UTC)
    store.set_status("gone2", DeviceState.REVOKED, reason="stolen", now=now)
    # Simulate a token row that survived (e.g. inserted by an older server version).
    from otaguard.server.storage.devices import tokens_table

    with store._engine.begin() as conn:
        conn.execute(
            tokens_table.insert().values(
                token_hash=hash_token("t" * 43), serial="gone2", expires_at=now + dt.timedelta(1)
            )
        )
    with pytest.raises(AccessDeniedError, match="device 'gone2' is revoked"):
        world.device("gone2", enroll=False).enroll("t" * 43, key_store=FILE_KEY)


def test_cacerts(world: World) -> None:
    url = urlsplit(world.server.base_url)
    assert world.server.ca_cert is not None
    ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/.well-known/est/cacerts")
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Type", "").startswith("application/pkcs7-mime")
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(data))
    names = {c.subject.rfc4514_string() for c in certs}
    assert names == {"CN=otaguard device issuing CA", "CN=otaguard device root CA"}


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_registry_operations(world: World) -> None:
    with fleet(world) as client:
        client.add_device("r1", HW)
        with pytest.raises(DeviceExistsError, match="already registered"):
            client.add_device("r1", HW)
        with pytest.raises(UnknownDeviceError, match="no device 'nope'"):
            client.show("nope")
        with pytest.raises(OperatorError, match=r"body.hardware_id: .* is not of the form"):
            client.add_device("r2", "bad hw")
        q = client.quarantine("r1", "odd traffic")
        assert (q.status, q.reason) == ("quarantined", "odd traffic")
        assert client.release("r1").status == "registered"
        with pytest.raises(OperatorError, match="not quarantined"):
            client.release("r1")
        r = client.revoke("r1", "decommissioned")
        assert (r.status, r.reason) == ("revoked", "decommissioned")
        with pytest.raises(OperatorError, match="revocation is final"):
            client.quarantine("r1", "again")
        assert [d.serial for d in client.list_devices()] == ["r1"]
    bad = FleetClient(
        server_url=world.server.base_url, ca_cert=world.server.ca_cert, token="x" * 43
    )
    with bad, pytest.raises(OperatorError, match="refused the operator token"):
        bad.list_devices()


def test_fleet_api_is_in_the_openapi_schema(world: World) -> None:
    paths = world.server.app.openapi()["paths"]
    for p in (
        "/api/v1/devices",
        "/api/v1/devices/{serial}",
        "/api/v1/devices/{serial}/quarantine",
        "/api/v1/devices/{serial}/release",
        "/api/v1/devices/{serial}/revoke",
        "/api/v1/devices/{serial}/token",
        "/.well-known/est/simpleenroll",
        "/.well-known/est/cacerts",
    ):
        assert p in paths, p
