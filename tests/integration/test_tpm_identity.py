"""The device key in a real (software) TPM: swtpm behind tpm2-abrmd, a real server, real TLS.

Trap (ADR 0006): a process that loads the tpm2 OpenSSL provider into Python's ``ssl``
cannot also sign with a *software* key through ``ssl`` (OpenSSL 3.0 exports the key into
the preferred provider as a public key only), and the test server runs in this process.
So everything that presents the TPM key in TLS (updates, renewal) runs in a child process,
as a device's agent does; enrollment itself presents no client key and runs here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import SSlibKey

from conftest import World, serial_of
from otaguard.agent import Device
from otaguard.agent.identity import load_identity
from otaguard.agent.tpm import TpmMonotonicStore
from otaguard.agent.tpm_key import TpmKeyStore, TpmSigner, tpm_public_key, tpm_sign
from otaguard.model.errors import (
    ConfigError,
    DeviceStorageError,
    NotEnrolledError,
    OperatorError,
)
from otaguard.model.unsafe import Unsafe
from otaguard.model.version import Version
from otaguard.server.client import FleetClient
from otaguard.sim.softtpm import BUS_ENV
from tpm_support import SessionBus, TpmBroker, require_tpm_broker_tools, running_swtpm

#: a child agent talks to the server, the TPM (via abrmd) and verifies an image
CHILD_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def session_bus() -> Iterator[SessionBus]:
    """One private D-Bus bus for every broker of the session (the variable is per process)."""
    require_tpm_broker_tools()
    bus = SessionBus()
    bus.start()
    before = os.environ.get(BUS_ENV)
    os.environ[BUS_ENV] = bus.address
    try:
        yield bus
    finally:
        if before is None:
            os.environ.pop(BUS_ENV, None)
        else:
            os.environ[BUS_ENV] = before
        bus.stop()


@pytest.fixture
def broker(session_bus: SessionBus, tmp_path: Path) -> Iterator[TpmBroker]:
    """A fresh swtpm behind its own tpm2-abrmd."""
    with running_swtpm(tmp_path / "tpmstate") as tpm:
        b = TpmBroker(tpm, session_bus, tmp_path / "abrmd.log")
        b.start()
        try:
            yield b
        finally:
            b.stop()


def tpm_device(world: World, broker: TpmBroker, name: str = "tpmdev") -> Device:
    return world.device(name, tpm_tcti=broker.tcti)


def fleet(world: World) -> FleetClient:
    return FleetClient(
        server_url=world.server.base_url,
        ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    )


def leaf(dev: Device) -> x509.Certificate:
    return x509.load_pem_x509_certificate(dev.paths.device_cert.read_bytes())


def child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python (the TPM key may be presented in TLS there)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )


def agent(world: World, dev: Device, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*world.cli(), "agent", str(dev.paths.root), action],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )


def test_enrollment_creates_the_key_in_the_tpm_and_it_never_leaves(
    world: World, broker: TpmBroker, tmp_path: Path
) -> None:
    from tpm2_pytss.constants import TPMA_OBJECT
    from tpm2_pytss.tsskey import TSSPrivKey

    dev = tpm_device(world, broker)
    assert dev.key_store == TpmKeyStore(broker.tcti)
    blob = dev.paths.device_key.read_bytes()
    # The certificate is for the key the TPM holds.
    assert leaf(dev).public_key() == tpm_public_key(blob)
    assert not dev.paths.device_key_next.exists()
    # The TPM made it and will not let it go.
    attrs = int(TSSPrivKey.from_pem(blob).public.publicArea.objectAttributes)
    for needed in (TPMA_OBJECT.FIXEDTPM, TPMA_OBJECT.FIXEDPARENT, TPMA_OBJECT.SENSITIVEDATAORIGIN):
        assert attrs & needed
    # The stored file holds no usable private key...
    with pytest.raises(ValueError, match="private key"):
        serialization.load_pem_private_key(blob, None)
    # ... and another TPM cannot use it (the wrapping key is this TPM's alone).
    with (
        running_swtpm(tmp_path / "other-tpm") as other,
        pytest.raises(DeviceStorageError, match="failed to sign with the device key"),
    ):
        tpm_sign(other.tcti, blob, b"payload")
    # Its own TPM can (through the broker).
    assert tpm_sign(broker.tcti, blob, b"payload")


def test_tpm_signer_signatures_verify_as_securesystemslib_expects(
    world: World, broker: TpmBroker
) -> None:
    dev = tpm_device(world, broker)
    signer = TpmSigner(tcti=broker.tcti, key_blob=dev.paths.device_key.read_bytes())
    key = SSlibKey.from_crypto(leaf(dev).public_key())
    assert key.scheme == "ecdsa-sha2-nistp256"
    assert signer.public_key.keyid == key.keyid
    sig = signer.sign(b"nonce-1234")
    key.verify_signature(sig, b"nonce-1234")
    with pytest.raises(UnverifiedSignatureError):
        key.verify_signature(sig, b"nonce-1235")


def test_a_tpm_device_updates_end_to_end_over_mutual_tls_with_its_tpm_key(
    world: World, broker: TpmBroker
) -> None:
    dev = tpm_device(world, broker)
    world.release("1.1.0", security=True, counter=1)
    done = agent(world, dev, "update")
    assert done.returncode == 0, done.stderr
    assert "updated" in done.stdout and "1.1.0" in done.stdout
    assert "not in a TPM" not in done.stderr  # no file-key warning: the key is in the TPM
    assert Device(dev.paths.root).status().booted.version == "1.1.0"  # type: ignore[union-attr]
    # The NV counters moved through the same broker while the TLS key was in use.
    version, counter = TpmMonotonicStore(broker.tcti, dev.paths.monotonic).read_tpm()
    assert version > Version.parse("1.0.0")  # the TPM keeps a lower bound of 1.1.0
    assert counter == 1


def test_another_tpm_cannot_present_the_key_in_tls(
    world: World, broker: TpmBroker, tmp_path: Path
) -> None:
    """The TLS client key really is this TPM's: through another TPM it does not load."""
    dev = tpm_device(world, broker)
    with running_swtpm(tmp_path / "other-tpm") as other:
        b = TpmBroker(other, broker.bus, tmp_path / "abrmd-other.log")
        b.start()
        try:
            results = {
                tcti: child(f"""
                    import ssl
                    from otaguard.agent.fetcher import create_ssl_context
                    try:
                        create_ssl_context(
                            ca_file={str(dev.paths.ca)!r},
                            client_cert={str(dev.paths.device_cert)!r},
                            client_key={str(dev.paths.device_key)!r},
                            client_key_tcti={tcti!r},
                        )
                    except ssl.SSLError as e:
                        print("refused", e)
                    else:
                        print("loaded")
                """)
                for tcti in (broker.tcti, b.tcti)
            }
        finally:
            b.stop()
    assert results[broker.tcti].stdout.startswith("loaded"), results[broker.tcti].stderr
    assert results[b.tcti].stdout.startswith("refused"), results[b.tcti].stderr


def test_renewal_before_expiry_makes_a_new_tpm_key(world: World, broker: TpmBroker) -> None:
    dev = tpm_device(world, broker)
    old_blob = dev.paths.device_key.read_bytes()
    old = leaf(dev)
    late = old.not_valid_after_utc - dt.timedelta(hours=2)
    done = child(f"""
        import datetime as dt
        from otaguard.agent import Device
        from otaguard.agent.identity import renew_if_due
        dev = Device({str(dev.paths.root)!r})
        renew_if_due(dev.paths, dev.config, key_store=dev.key_store,
                     now=dt.datetime.fromisoformat({late.isoformat()!r}))
    """)
    assert done.returncode == 0, done.stderr
    new_blob = dev.paths.device_key.read_bytes()
    assert new_blob != old_blob
    assert leaf(dev).serial_number != old.serial_number
    assert leaf(dev).public_key() == tpm_public_key(new_blob)
    assert not dev.paths.device_key_next.exists()
    with fleet(world) as client:
        assert len(client.show(serial_of("tpmdev")).cert_serials) == 2
    # The renewed identity works over mutual TLS.
    assert agent(world, dev, "check").returncode == 0


def _cut_at(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Cut power when the identity store reaches ``target`` ("cert" or "rename")."""
    from otaguard.agent import identity

    real_write, real_replace = identity.atomic_write_bytes, identity.os.replace

    class PowerCut(OSError):
        pass

    def write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        if target == "cert" and path.name == "device.pem":
            raise PowerCut(5, "power cut")
        real_write(path, data, mode=mode)

    def replace(src: Path, dst: Path) -> None:
        if target == "rename" and Path(src).name == "device.key.new":
            raise PowerCut(5, "power cut")
        real_replace(src, dst)

    monkeypatch.setattr(identity, "atomic_write_bytes", write)
    monkeypatch.setattr(identity.os, "replace", replace)


def _token(world: World, dev: Device) -> str:
    with fleet(world) as client:
        return client.new_token(dev.config.serial).token


def test_power_cut_in_first_enrollment_leaves_a_cleanly_unenrolled_device(
    world: World, broker: TpmBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = world.device("cut1", tpm_tcti=broker.tcti, enroll=False)
    with fleet(world) as client:
        token = client.add_device(dev.config.serial, dev.config.hardware_id).token
    with monkeypatch.context() as m:
        _cut_at(m, "cert")
        with pytest.raises(DeviceStorageError, match="cannot store the device identity"):
            dev.enroll(token, key_store=dev.key_store)
    assert dev.paths.device_key_next.exists() and not dev.paths.device_cert.exists()
    with pytest.raises(NotEnrolledError, match="device enroll"):
        load_identity(dev.paths, dev.config, key_store=dev.key_store)
    # A new token enrolls it; the leftover key is gone.
    dev.enroll(_token(world, dev), key_store=dev.key_store)
    load_identity(dev.paths, dev.config, key_store=dev.key_store)
    assert not dev.paths.device_key_next.exists()


@pytest.mark.parametrize("cut", ["cert", "rename"])
def test_power_cut_while_replacing_the_pair_leaves_a_matching_pair(
    world: World, broker: TpmBroker, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    """Re-enrollment stores a new pair exactly as renewal does (``_store``)."""
    dev = tpm_device(world, broker, f"cut-{cut}")
    old_cert, old_key = dev.paths.device_cert.read_bytes(), dev.paths.device_key.read_bytes()
    token = _token(world, dev)
    with monkeypatch.context() as m:
        _cut_at(m, cut)
        with pytest.raises(DeviceStorageError, match="cannot store the device identity"):
            dev.enroll(token, key_store=dev.key_store)
    assert dev.paths.device_key.read_bytes() == old_key  # the old key is not removed yet
    load_identity(dev.paths, dev.config, key_store=dev.key_store)
    blob = dev.paths.device_key.read_bytes()
    assert leaf(dev).public_key() == tpm_public_key(blob)
    assert not dev.paths.device_key_next.exists()
    if cut == "cert":  # the old pair stays in use
        assert (dev.paths.device_cert.read_bytes(), blob) == (old_cert, old_key)
    else:  # the new certificate was stored: its key is finished into place
        assert dev.paths.device_cert.read_bytes() != old_cert and blob != old_key
    assert agent(world, dev, "check").returncode == 0


def test_power_cut_during_renewal_leaves_the_old_pair(world: World, broker: TpmBroker) -> None:
    dev = tpm_device(world, broker)
    old_cert, old_key = dev.paths.device_cert.read_bytes(), dev.paths.device_key.read_bytes()
    late = leaf(dev).not_valid_after_utc - dt.timedelta(hours=2)
    done = child(f"""
        import datetime as dt, os, sys
        import otaguard.agent.identity as identity
        from otaguard.agent import Device
        real = identity.atomic_write_bytes
        def write(path, data, *, mode=0o644):
            if path.name == "device.pem":
                os._exit(9)  # power cut: nothing after this point happens
            real(path, data, mode=mode)
        identity.atomic_write_bytes = write
        dev = Device({str(dev.paths.root)!r})
        identity.renew_if_due(dev.paths, dev.config, key_store=dev.key_store,
                              now=dt.datetime.fromisoformat({late.isoformat()!r}))
    """)
    assert done.returncode == 9, done.stderr
    assert dev.paths.device_key_next.exists()
    load_identity(dev.paths, dev.config, key_store=dev.key_store)
    assert dev.paths.device_cert.read_bytes() == old_cert
    assert dev.paths.device_key.read_bytes() == old_key
    assert not dev.paths.device_key_next.exists()
    assert agent(world, dev, "check").returncode == 0


def test_a_tpm_device_refuses_the_file_key_store(world: World, broker: TpmBroker) -> None:
    dev = world.device("nofile", tpm_tcti=broker.tcti, enroll=False)
    with pytest.raises(OperatorError, match="its key belongs in it"):
        dev.enroll("some-token", key_store=Unsafe.FILE_DEVICE_KEY)
    with pytest.raises(OperatorError, match="not configured with the TPM"):
        dev.enroll("some-token", key_store=TpmKeyStore("device:/dev/tpmrm9"))


def test_a_single_client_tcti_is_refused_for_the_tls_key(world: World, tmp_path: Path) -> None:
    """A raw swtpm TCTI enrolls (tpm2-pytss, one connection per call) but cannot serve TLS:
    the provider would hold the TPM and the NV counters would wait forever."""
    with running_swtpm(tmp_path / "raw-tpm") as raw:
        dev = world.device("raw", tpm_tcti=raw.tcti)
        assert dev.paths.device_key.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY")
        done = agent(world, dev, "check")
    assert done.returncode != 0
    assert "serves one client at a time" in done.stderr and "resource manager" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_file_key_on_a_tpm_device_is_refused(world: World, broker: TpmBroker) -> None:
    """A device given a TPM after enrolling with a file key must enroll again."""
    dev = world.device("was-file")
    config = dataclasses.replace(dev.config, tpm=broker.tcti)
    with pytest.raises(ConfigError, match="not a TPM key: enroll again"):
        load_identity(dev.paths, config, key_store=TpmKeyStore(broker.tcti))


def test_enrolling_with_an_unreachable_tpm_is_a_one_line_error(
    world: World, broker: TpmBroker
) -> None:
    dev = world.device("gone", tpm_tcti=broker.tcti, enroll=False)
    broker.stop()
    done = subprocess.run(
        [*world.cli(), "device", "enroll", str(dev.paths.root), "--token", "some-token"],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert done.returncode != 0
    assert "cannot reach the TPM" in done.stderr
    assert "Traceback" not in done.stderr
    assert not dev.paths.device_key.exists() and not dev.paths.device_key_next.exists()


@pytest.mark.slow
def test_the_demo_makes_some_devices_tpm_backed(session_bus: SessionBus, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "otaguard", "demo", "--devices", "4", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 devices TPM-backed" in done.stdout and "1 with development file keys" in done.stdout
    assert (
        "PASS: 4/4 devices updated, staged rollout completed, unhealthy rollout halted, "
        "8/8 attacks refused, crash-looping rollout paused by its alert, 2/2 monitoring "
        "quarantines (cloned credential, tampered slot)" in done.stdout
    )
    # the monitoring step prints each alert: signal and subject, observed, threshold, action
    assert "ALERT cohort-anomaly cohort:meter-v1@2.0.0" in done.stdout
    assert "action     pause-rollout → paused meters-2.0.0" in done.stdout
    # every device says what its delta moved, the TPM-backed ones from their own processes too
    assert "bytes moved for 1.1.0 (4 devices reporting their downloads)" in done.stdout
    # 1.1.0 went through the k-of-n ceremony, one signer in SoftHSM2 (make sysdeps)
    assert "1.1.0 staged, signed by targets-ml-dsa-65 and targets-ecdsa-p256 (in SoftHSM2)" in (
        done.stdout
    )
    key = tmp_path / "devices" / "device-04" / "identity" / "device.key"
    assert key.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")


def test_the_provider_serves_one_tpm_and_leaves_hashing_in_software(broker: TpmBroker) -> None:
    """In one process: a second TCTI is refused; SHA-256 does not go through the TPM."""
    done = child(f"""
        import hashlib, time
        from otaguard.agent._tls_tpm import load_tpm_provider
        from otaguard.model.errors import ConfigError
        load_tpm_provider({broker.tcti!r})
        load_tpm_provider({broker.tcti!r})  # the same TPM again: fine
        try:
            load_tpm_provider("tabrmd:bus_name=com.example.other,bus_type=session")
        except ConfigError as e:
            print("refused:", e)
        started = time.monotonic()
        hashlib.sha256(bytes(20 * 1024 * 1024)).digest()
        print("hash seconds:", time.monotonic() - started)
    """)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused:") and "one TPM per process" in lines[0]
    # In software 20 MiB take ~30 ms; through the TPM (1 KiB per command) many seconds.
    assert float(lines[1].split(":")[1]) < 1.0, lines[1]


@pytest.mark.parametrize(
    "tcti", ["swtpm:host=127.0.0.1,port=2321", "swtpm", "mssim:port=2321", "device:/dev/tpm0"]
)
def test_single_client_tctis_are_refused_before_loading_anything(tcti: str) -> None:
    from otaguard.agent._tls_tpm import load_tpm_provider
    from otaguard.model.errors import ConfigError

    with pytest.raises(ConfigError, match="serves one client at a time"):
        load_tpm_provider(tcti)
