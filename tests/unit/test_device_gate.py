"""The device gate keeps what it verified of a certificate's bytes, never its verdict.

A certificate's parse, issuer and signature are checked once per certificate; its
validity period and the registry (status, certificates issued) on every request.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Engine

from otaguard.agent.identity import build_csr
from otaguard.crypto.device_ca import DeviceCA
from otaguard.model.errors import AccessDeniedError
from otaguard.server._tls import TLS_EXTENSION
from otaguard.server.device_auth import DeviceGate
from otaguard.server.storage.base import DeviceState
from otaguard.server.storage.devices import SQLDeviceStore

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
LIFETIME = dt.timedelta(hours=24)


def _scope(cert: x509.Certificate) -> dict[str, object]:
    pem = ssl.DER_cert_to_PEM_cert(cert.public_bytes(serialization.Encoding.DER))
    return {"extensions": {TLS_EXTENSION: {"client_cert_chain": [pem]}}}


def _issue(
    ca: DeviceCA, key: ec.EllipticCurvePrivateKey, *, now: dt.datetime, lifetime: dt.timedelta
) -> x509.Certificate:
    """A certificate for device d1 (hardware id hw) from ``ca``."""
    return ca.issue(
        x509.load_der_x509_csr(build_csr(key, "d1")),
        serial="d1",
        hardware_id="hw",
        now=now,
        lifetime=lifetime,
    )


def test_a_verified_certificate_is_still_checked_for_expiry_and_registry_on_each_request(
    db_engine: Engine, tmp_path: Path
) -> None:
    ca = DeviceCA.load_or_create(tmp_path / "device-ca", now=NOW - dt.timedelta(days=1))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(ca, key, now=NOW, lifetime=LIFETIME)
    devices = SQLDeviceStore(db_engine)
    devices.add("d1", "hw", token_hash="0" * 64, token_expires=NOW, now=NOW)
    devices.record_certificate(
        "d1", format(cert.serial_number, "x"), not_after=cert.not_valid_after_utc, now=NOW
    )
    clock = [NOW]
    gate = DeviceGate(devices, issuing_ca=ca.issuing, clock=lambda: clock[0], required=True)
    dev = gate.authenticate(_scope(cert))
    assert dev is not None and dev.record.serial == "d1"
    assert gate.authenticate(_scope(cert)) is not None  # the kept verification
    # The registry is read again: a quarantine refuses the very next request.
    devices.set_status("d1", DeviceState.QUARANTINED, reason="odd traffic", now=NOW)
    with pytest.raises(AccessDeniedError, match="device d1 is quarantined: odd traffic"):
        gate.authenticate(_scope(cert))
    devices.set_status("d1", DeviceState.ENROLLED, reason="", now=NOW)
    assert gate.authenticate(_scope(cert)) is not None
    # The validity period is checked again: the same bytes, expired now, are refused.
    clock[0] = NOW + LIFETIME + dt.timedelta(seconds=1)
    with pytest.raises(AccessDeniedError, match="client certificate of d1 expired"):
        gate.authenticate(_scope(cert))
    # A certificate with the same subject and key, signed by another CA, is not the kept one.
    clock[0] = NOW
    rogue = DeviceCA.load_or_create(tmp_path / "rogue-ca", now=NOW - dt.timedelta(days=1))
    forged = _issue(rogue, key, now=NOW, lifetime=LIFETIME)
    with pytest.raises(AccessDeniedError, match="device CA"):
        gate.authenticate(_scope(forged))
    devices.close()


def test_the_fleet_listing_is_one_statement_and_agrees_with_each_device_read(
    db_engine: Engine,
) -> None:
    devices = SQLDeviceStore(db_engine)
    for serial in ("d2", "d1", "d3"):
        devices.add(serial, "hw", token_hash=serial * 32, token_expires=NOW, now=NOW)
    later = NOW + dt.timedelta(hours=1)
    devices.record_certificate("d1", "c2", not_after=later + LIFETIME, now=later)
    devices.record_certificate("d1", "c1", not_after=NOW + LIFETIME, now=NOW)
    devices.record_certificate("d3", "c3", not_after=NOW + LIFETIME, now=NOW)
    listed = devices.list()
    assert [d.serial for d in listed] == ["d1", "d2", "d3"]
    assert listed == [devices.get(s) for s in ("d1", "d2", "d3")]
    assert listed[0].cert_serials == ("c1", "c2")  # oldest first
    assert listed[1].cert_serials == () and listed[1].certs_valid_until is None
    devices.close()


def test_the_registry_check_is_one_row_however_many_certificates_a_device_was_issued(
    db_engine: Engine, tmp_path: Path
) -> None:
    """Day-long certificates: a device renews daily. The gate's read names the presented
    certificate and returns one row (it read every certificate the device was ever issued),
    and a certificate the registry did not issue to this device is still refused."""
    from sqlalchemy import event

    from otaguard.server.storage.checkins import SQLCheckinStore

    ca = DeviceCA.load_or_create(tmp_path / "device-ca", now=NOW - dt.timedelta(days=1))
    key = ec.generate_private_key(ec.SECP256R1())
    devices = SQLDeviceStore(db_engine)
    devices.add("d1", "hw", token_hash="0" * 64, token_expires=NOW, now=NOW)
    certs = []
    for day in range(30):
        cert = _issue(
            ca, key, now=NOW - dt.timedelta(days=day), lifetime=LIFETIME + dt.timedelta(days=day)
        )
        devices.record_certificate(
            "d1", format(cert.serial_number, "x"), not_after=cert.not_valid_after_utc, now=NOW
        )
        certs.append(cert)
    SQLCheckinStore(db_engine).register_attestation_key("d1", "AK PEM", now=NOW)
    statements: list[str] = []
    event.listen(db_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    gate = DeviceGate(devices, issuing_ca=ca.issuing, clock=lambda: NOW, required=True)
    dev = gate.authenticate(_scope(certs[17]))
    assert dev is not None and dev.record.attestation_key == "AK PEM"
    # one statement, reading no certificate's columns (one row, not one per certificate)
    assert len(statements) == 1 and "not_after" not in statements[0], statements
    # a certificate of the same CA and subject the registry never recorded for d1
    unrecorded = _issue(ca, key, now=NOW, lifetime=LIFETIME)
    with pytest.raises(AccessDeniedError, match="was not issued to device d1 by the registry"):
        gate.authenticate(_scope(unrecorded))
    devices.close()
