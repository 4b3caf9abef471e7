"""The pure check-in verification: bytes + certificate + nonce record in, manifest or refusal.

No server, no socket: a device CA certificate, a manifest signed with its key, and
nonce records in every state. The same code the route runs (tests/integration/
test_checkin.py drives it over real mutual TLS).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner
from sqlalchemy.engine import Engine

from otaguard.agent.identity import build_csr
from otaguard.crypto.device_ca import DeviceCA
from otaguard.crypto.envelope import sign_envelope
from otaguard.model.errors import VerificationError
from otaguard.model.manifest import (
    RECOVERY_MEASUREMENT,
    BootMeasurement,
    DeviceManifest,
    InstalledTarget,
)
from otaguard.server.attestation import ListedImage, assess_boot, parse_attest
from otaguard.server.checkin_verify import CheckinRefusedError, verify_checkin
from otaguard.server.storage.base import NonceRecord
from otaguard.server.storage.checkins import (
    MAX_OPEN_NONCES_PER_CERT,
    NONCE_PURGE_INTERVAL,
    SPENT_NONCE_KEPT,
    SQLCheckinStore,
)
from otaguard.server.storage.devices import SQLDeviceStore
from otaguard.server.storage.unit import unit_of_work

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
TTL = dt.timedelta(seconds=60)
GOOD = hashlib.sha256(b"good image").hexdigest()
EVIL = hashlib.sha256(b"evil image").hexdigest()


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> tuple[x509.Certificate, CryptoSigner]:
    ca = DeviceCA.load_or_create(tmp_path_factory.mktemp("ca") / "device-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(
        x509.load_der_x509_csr(build_csr(key, "d1")),
        serial="d1",
        hardware_id="hw",
        now=NOW,
        lifetime=dt.timedelta(hours=24),
    )
    return cert, CryptoSigner(key)


def manifest(serial: str = "d1", nonce: str = "n1", boot: str = GOOD) -> DeviceManifest:
    return DeviceManifest(
        serial=serial,
        nonce=nonce,
        time=NOW.isoformat(),
        installed=InstalledTarget("fw-1.1.0.img", 10, GOOD, "1.1.0", 1),
        last_result={"outcome": "updated"},
        boot=BootMeasurement(sha256=boot, slot="B", attested=False),
        quote=None,
    )


def record(**changes: object) -> NonceRecord:
    rec = NonceRecord("n1", "d1", "c1", NOW, NOW + dt.timedelta(seconds=60), None)
    return dataclasses.replace(rec, **changes)  # type: ignore[arg-type]


def verify(identity: tuple[x509.Certificate, CryptoSigner], data: bytes, rec: NonceRecord | None):  # type: ignore[no-untyped-def]
    cert, _ = identity
    return verify_checkin(data, certificate=cert, serial="d1", cert_serial="c1", nonce=rec, now=NOW)


def signed(identity: tuple[x509.Certificate, CryptoSigner], m: DeviceManifest) -> bytes:
    return sign_envelope(identity[1], m.to_dict())


def test_a_good_check_in_verifies(identity: tuple[x509.Certificate, CryptoSigner]) -> None:
    assert verify(identity, signed(identity, manifest()), record()) == manifest()


@pytest.mark.parametrize(
    ("rec", "reason"),
    [
        (None, "unknown nonce"),
        (record(nonce="n2"), "unknown nonce"),
        (record(serial="d2"), "the nonce was issued to another device"),
        (record(cert_serial="c2"), "the nonce was issued to another certificate"),
        (record(used_at=NOW), "the nonce was already used (replay)"),
        (record(expires_at=NOW), "the nonce has expired"),
    ],
)
def test_nonce_refusals(
    identity: tuple[x509.Certificate, CryptoSigner], rec: NonceRecord | None, reason: str
) -> None:
    with pytest.raises(CheckinRefusedError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        verify(identity, signed(identity, manifest()), rec)


def test_a_manifest_for_another_serial(identity: tuple[x509.Certificate, CryptoSigner]) -> None:
    with pytest.raises(CheckinRefusedError, match="the manifest is for device 'd2'"):
        verify(identity, signed(identity, manifest(serial="d2")), record(serial="d2"))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[]", 'must be {"signed"'),
        (b'{"signed": {}, "signatures": []}', "exactly one signature"),
        (b'{"signed": {}, "signatures": [{"keyid": 1}]}', "signature is malformed"),
        (b"x" * (65 * 1024), "exceeds"),
    ],
)
def test_hostile_envelopes(
    identity: tuple[x509.Certificate, CryptoSigner], data: bytes, reason: str
) -> None:
    with pytest.raises(CheckinRefusedError, match=reason):
        verify(identity, data, record())


def test_strict_manifest_parsing(identity: tuple[x509.Certificate, CryptoSigner]) -> None:
    raw = manifest().to_dict()
    for bad, reason in (
        ({**raw, "extra": 1}, "unknown fields extra"),
        ({**raw, "_type": "root"}, "not a otaguard-device-manifest"),
        ({**raw, "installed": {**raw["installed"], "length": True}}, "non-negative integer"),
        ({**raw, "boot": {**raw["boot"], "sha256": "AB"}}, "lowercase hex SHA-256"),
    ):
        with pytest.raises(CheckinRefusedError, match=reason):
            verify(identity, sign_envelope(identity[1], bad), record())


def test_an_attested_claim_needs_a_quote(identity: tuple[x509.Certificate, CryptoSigner]) -> None:
    m = dataclasses.replace(manifest(), boot=BootMeasurement(GOOD, "B", attested=True))
    with pytest.raises(CheckinRefusedError, match="attested measurement without a quote"):
        verify(identity, signed(identity, m), record())


def test_parse_attest_refuses_garbage() -> None:
    for data, reason in (
        (b"", "truncated"),
        (b"\x00" * 64, "not generated by a TPM"),
        (bytes.fromhex("ff544347") + b"\x80\x17" + b"\x00" * 60, "not a quote"),
    ):
        with pytest.raises(VerificationError, match=reason):
            parse_attest(data)


def test_assess_boot() -> None:
    listed = [ListedImage("fw-1.1.0.img", GOOD, 10), ListedImage("fw-1.0.0.img", "0" * 64, 10)]
    assert assess_boot(manifest(), listed=listed) is None
    assert "target fw-1.1.0.img is" in (assess_boot(manifest(boot=EVIL), listed=listed) or "")
    factory = dataclasses.replace(
        manifest(), installed=InstalledTarget("factory-1.1.0", 10, GOOD, "1.1.0", 1)
    )
    assert assess_boot(factory, listed=listed) is None  # a factory image published as a release
    evil_factory = dataclasses.replace(factory, boot=BootMeasurement(EVIL, "A", attested=False))
    assert "does not list" in (assess_boot(evil_factory, listed=listed) or "")
    recovery = dataclasses.replace(
        manifest(), installed=None, boot=BootMeasurement(RECOVERY_MEASUREMENT, None, False)
    )
    assert assess_boot(recovery, listed=listed) is None


def test_a_nonce_is_spent_once(db_engine: Engine) -> None:
    # On SQLite and on PostgreSQL (the db_engine fixture runs it on both).
    devices = SQLDeviceStore(db_engine)
    devices.add("d1", "hw", token_hash="0" * 64, token_expires=NOW, now=NOW)
    store = SQLCheckinStore(db_engine)
    store.issue_nonce(record())
    assert store.spend_nonce("n1", now=NOW)
    assert not store.spend_nonce("n1", now=NOW)  # a second process racing loses
    got = store.get_nonce("n1")
    assert got is not None and got.used_at is not None
    # Expired nonces are forgotten when the next one is issued.
    store.issue_nonce(record(nonce="n2", issued_at=NOW + dt.timedelta(hours=1)))
    assert store.get_nonce("n1") is None
    # A device asking for nonces in a loop keeps only its newest few open.
    for i in range(MAX_OPEN_NONCES_PER_CERT + 3):
        issued = NOW + dt.timedelta(hours=1, seconds=i)
        store.issue_nonce(record(nonce=f"m{i}", issued_at=issued, expires_at=issued + TTL))
    kept = [i for i in range(MAX_OPEN_NONCES_PER_CERT + 3) if store.get_nonce(f"m{i}")]
    assert kept == list(range(3, MAX_OPEN_NONCES_PER_CERT + 3))
    assert store.register_attestation_key("d1", "PEM-A", now=NOW)
    assert store.register_attestation_key("d1", "PEM-A", now=NOW)
    assert not store.register_attestation_key("d1", "PEM-B", now=NOW)
    store.close()
    devices.close()


def test_a_spent_day_long_nonce_is_forgotten_soon_after_use(db_engine: Engine) -> None:
    """A next-check-in nonce lives a day (ADR 0036); once spent it is kept only
    SPENT_NONCE_KEPT (a replay then is refused as unknown), so the table stays about one
    row per device. An unspent one stays until it expires."""
    devices = SQLDeviceStore(db_engine)
    devices.add("d1", "hw", token_hash="0" * 64, token_expires=NOW, now=NOW)
    store = SQLCheckinStore(db_engine)
    day = dt.timedelta(hours=24)
    store.issue_nonce(record(nonce="spent", expires_at=NOW + day))
    store.issue_nonce(record(nonce="open", expires_at=NOW + day, cert_serial="c9"))
    assert store.claim_nonce("spent", serial="d1", cert_serial="c1", now=NOW) is not None
    soon = NOW + SPENT_NONCE_KEPT - dt.timedelta(seconds=1)
    store.issue_nonce(record(nonce="a", issued_at=soon, expires_at=soon + TTL))
    assert store.get_nonce("spent") is not None  # a replay now is named as one
    later = NOW + SPENT_NONCE_KEPT + NONCE_PURGE_INTERVAL + dt.timedelta(seconds=1)
    store.issue_nonce(record(nonce="b", issued_at=later, expires_at=later + TTL))
    assert store.get_nonce("spent") is None
    assert store.get_nonce("open") is not None  # unspent, within its day
    store.close()
    devices.close()


def test_a_nonce_is_claimed_once_and_only_by_its_device_certificate_and_in_time(
    db_engine: Engine,
) -> None:
    # The check-in's one statement: spend if unused, unexpired, this serial and certificate.
    devices = SQLDeviceStore(db_engine)
    devices.add("d1", "hw", token_hash="0" * 64, token_expires=NOW, now=NOW)
    devices.add("d2", "hw", token_hash="1" * 64, token_expires=NOW, now=NOW)
    store = SQLCheckinStore(db_engine)
    store.issue_nonce(record())
    assert store.claim_nonce("n1", serial="d2", cert_serial="c1", now=NOW) is None
    assert store.claim_nonce("n1", serial="d1", cert_serial="c2", now=NOW) is None
    expiry = NOW + dt.timedelta(seconds=60)
    assert store.claim_nonce("n1", serial="d1", cert_serial="c1", now=expiry) is None
    assert store.get_nonce("n1") == record()  # the refused claims changed nothing
    claimed = store.claim_nonce("n1", serial="d1", cert_serial="c1", now=NOW)
    assert claimed == record()  # the record as it was before the claim
    assert store.claim_nonce("n1", serial="d1", cert_serial="c1", now=NOW) is None  # replay
    got = store.get_nonce("n1")
    assert got is not None and got.used_at == NOW
    # Inside a unit that rolls back (a refusal after the claim), the claim is undone.
    store.issue_nonce(record(nonce="n3"))

    def claim_then_refuse() -> None:
        with unit_of_work(db_engine):
            assert store.claim_nonce("n3", serial="d1", cert_serial="c1", now=NOW) is not None
            raise RuntimeError("refused later")

    with pytest.raises(RuntimeError, match="refused later"):
        claim_then_refuse()
    assert store.get_nonce("n3") == record(nonce="n3")
    with unit_of_work(db_engine):
        assert store.claim_nonce("n3", serial="d1", cert_serial="c1", now=NOW) is not None
    assert store.claim_nonce("n3", serial="d1", cert_serial="c1", now=NOW) is None
    store.close()
    devices.close()


def test_an_accepted_check_in_is_one_claim_record_and_next_nonce_or_nothing(
    db_engine: Engine,
) -> None:
    """accept_checkin (on PostgreSQL one statement): the record, the health row and the
    next nonce are written only when the nonce is claimed now, for this device and
    certificate; a replay, another certificate's nonce or an expired one writes nothing."""
    from otaguard.server.storage.base import CheckinRecord
    from otaguard.server.storage.monitoring import HealthNote, SQLMonitorStore

    devices = SQLDeviceStore(db_engine)
    devices.add("d1", "hw", token_hash="0" * 64, token_expires=NOW, now=NOW)
    store = SQLCheckinStore(db_engine)
    store.issue_nonce(record(expires_at=NOW + TTL))
    entry = CheckinRecord(
        serial="d1", cert_serial="c1", time=NOW, device_time="t", running_version="1.0.0",
        target="fw", boot_sha256="0" * 64, attested=False, reset_count=None,
        outcome="accepted", detail="", manifest=b"{}",
    )  # fmt: skip

    monitor = SQLMonitorStore(db_engine)

    def accept(nonce: str, nxt: str, **changes: object) -> bool:
        checkin = dataclasses.replace(entry, **changes)  # type: ignore[arg-type]
        return store.accept_checkin(
            checkin,
            nonce=nonce,
            next_nonce=record(nonce=nxt, expires_at=NOW + dt.timedelta(days=1)),
            health=HealthNote("d1", "hw", checkin.running_version, None, checkin.time),
        )

    def running() -> tuple[str, dt.datetime | None] | None:
        health = monitor.health("d1")
        return None if health is None else (health.running_version, health.last_seen)

    assert not accept("n1", "x1", cert_serial="c2")  # another certificate's nonce
    assert not accept("n1", "x2", time=NOW + TTL)  # expired by then
    assert store.history("d1", limit=5) == [] and store.get_nonce("x1") is None
    assert store.get_nonce("x2") is None and running() is None
    assert accept("n1", "next")
    assert [c.running_version for c in store.history("d1", limit=5)] == ["1.0.0"]
    assert running() == ("1.0.0", NOW)  # the health row made with the record
    spent, nxt = store.get_nonce("n1"), store.get_nonce("next")
    assert spent is not None and spent.used_at == NOW
    assert nxt is not None and nxt.used_at is None and nxt.cert_serial == "c1"
    assert not accept("n1", "again", running_version="6.6.6")  # the replay: nothing written
    assert len(store.history("d1", limit=5)) == 1 and store.get_nonce("again") is None
    assert running() == ("1.0.0", NOW)
    later = NOW + dt.timedelta(minutes=1)
    assert accept("next", "third", running_version="1.1.0", time=later)
    assert running() == ("1.1.0", later)  # the row updated in place
    store.close()
    devices.close()
