"""Measured boot and attestation with a real (software) TPM, over real mutual TLS.

Each test starts its own swtpm (``tests/tpm_support.py``; fails rather than skips under
``CI=true``) and a real server. A device with ``--tpm`` registers its attestation key
at enrollment; each boot extends PCR 9 with the booted image's digest; each check-in
carries a TPM2_Quote over PCR 9 qualified by the server's nonce.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_checkin import error, fleet, nonce_for, request, tamper_running_slot

from conftest import World
from otaguard.agent import Device
from otaguard.agent.checkin import CHECKIN_PATH, build_manifest, register_attestation_key
from otaguard.agent.identity import device_signer, renew_if_due
from otaguard.agent.measured_boot import TpmAttestor, read_event_log
from otaguard.crypto.envelope import sign_envelope
from otaguard.model.errors import AccessDeniedError
from otaguard.model.manifest import Quote, quote_qualifying_data
from otaguard.model.unsafe import Unsafe
from tpm_support import Swtpm, running_swtpm


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    with running_swtpm(tmp_path / "tpmstate") as tpm:
        yield tpm


def tpm_device(world: World, swtpm: Swtpm, name: str) -> Device:
    # The TPM holds floor, PCR 9 and the attestation key; the TLS key stays a file here so
    # the agent can run in this process beside the server (ADR 0006); test_tpm_identity.py
    # covers the TPM-held key, and its end-to-end update both together (an attested
    # check-in signed by the TPM key, in the agent's own process).
    dev = world.device(name, tpm_tcti=swtpm.tcti, unsafe_file_device_key=True)
    # What the first check-in does before its first quote (agent/checkin.py), done up front
    # so that each test starts from a registered attestation key and no check-in yet.
    fetcher = dev._fetcher(dev._tls_with_identity(renew=False))
    try:
        register_attestation_key(fetcher, config=dev.config, tpm=TpmAttestor(swtpm.tcti))
    finally:
        fetcher.close()
    return dev


def post_manifest(world: World, dev: Device, m: object) -> tuple[int, bytes]:
    signed = sign_envelope(device_signer(dev.paths, dev.config), m.to_dict())  # type: ignore[attr-defined]
    return request(world, dev, "POST", CHECKIN_PATH, signed)


def status_of(world: World, serial: str) -> tuple[str, str, list[str]]:
    with fleet(world) as client:
        d = client.show(serial)
        alerts = [a[2] for a in client.checkins(serial).alerts]
    return d.status, d.reason, alerts


def test_an_attested_check_in(world: World, swtpm: Swtpm) -> None:
    dev = tpm_device(world, swtpm, "t1")
    result = dev.checkin()
    assert result.attested
    assert result.boot_sha256 == world.releases["1.0.0"].sha256
    with fleet(world) as client:
        history = client.checkins("t1")
    assert history.attestation_key and history.checkins[0].attested
    assert dev.update().outcome == "up-to-date"  # every update check is attested too


def test_a_tpm_reset_starts_a_new_epoch(world: World, swtpm: Swtpm) -> None:
    dev = tpm_device(world, swtpm, "t2")
    dev.checkin()
    before = read_event_log(dev.paths)[-1].reset_count
    swtpm.restart()  # power cycle: PCRs back to zero, resetCount goes up
    dev.boot()  # the bootloader measures again into the fresh PCR
    events = read_event_log(dev.paths)
    assert len(events) == 1 and events[0].reset_count != before
    assert dev.checkin().attested


def test_acceptance_a_tampered_boot_quarantines_the_device_attested(
    world: World, swtpm: Swtpm, tmp_path: Path
) -> None:
    dev = tpm_device(world, swtpm, "t3")
    dev.checkin()
    digest = tamper_running_slot(dev, tmp_path)
    assert dev.boot().sha256 == digest  # the bootloader is fooled, the PCR records it
    with pytest.raises(AccessDeniedError, match="t3 quarantined at check-in: booted an image"):
        dev.update()
    status, reason, alerts = status_of(world, "t3")
    assert status == "quarantined" and digest[:16] in reason
    assert alerts and digest[:16] in alerts[0]
    with fleet(world) as client:
        assert client.checkins("t3").checkins[0].outcome == "quarantined"


def test_an_event_log_rewritten_to_hide_the_boot_does_not_replay(
    world: World, swtpm: Swtpm, tmp_path: Path
) -> None:
    dev = tpm_device(world, swtpm, "t4")
    good = world.releases["1.0.0"].sha256
    tamper_running_slot(dev, tmp_path)
    dev.boot()
    # The attacker claims the good image in the log; the PCR still holds the evil one.
    log = json.loads(dev.paths.event_log.read_text())
    log["events"][-1]["sha256"] = good
    dev.paths.event_log.write_text(json.dumps(log))
    with pytest.raises(AccessDeniedError, match="does not match the replayed event log"):
        dev.checkin()
    status, reason, _ = status_of(world, "t4")
    assert status == "quarantined" and "invalid TPM quote" in reason


def test_a_quote_for_another_nonce_is_refused(world: World, swtpm: Swtpm) -> None:
    dev = tpm_device(world, swtpm, "t5")
    tpm = TpmAttestor(swtpm.tcti)
    nonce = nonce_for(world, dev)
    m = build_manifest(dev.paths, dev.config, nonce=nonce, tpm=tpm)
    assert m.quote is not None
    # A quote the TPM really made, but for an earlier nonce (a replayed quote).
    attest, sig = tpm.quote(quote_qualifying_data("an-earlier-nonce", "t5"))
    m = dataclasses.replace(m, quote=Quote(attest, sig, m.quote.events))
    status, data = post_manifest(world, dev, m)
    assert status == 403
    assert "invalid TPM quote: the quote is not for this check-in's nonce" in error(data)


def test_a_forged_quote_signature_is_refused(world: World, swtpm: Swtpm) -> None:
    dev = tpm_device(world, swtpm, "t6")
    m = build_manifest(
        dev.paths, dev.config, nonce=nonce_for(world, dev), tpm=TpmAttestor(swtpm.tcti)
    )
    assert m.quote is not None
    # Flip a byte of the PCR digest at the end of the attest structure.
    forged = m.quote.attest[:-1] + bytes([m.quote.attest[-1] ^ 1])
    m = dataclasses.replace(m, quote=dataclasses.replace(m.quote, attest=forged))
    status, data = post_manifest(world, dev, m)
    assert status == 403
    assert "the quote's signature does not verify with the attestation key" in error(data)


def test_a_tpm_device_without_a_quote_is_quarantined(world: World, swtpm: Swtpm) -> None:
    dev = tpm_device(world, swtpm, "t7")
    m = build_manifest(dev.paths, dev.config, nonce=nonce_for(world, dev), tpm=None)
    status, data = post_manifest(world, dev, m)
    assert status == 403
    assert "no TPM quote from a device that registered an attestation key" in error(data)
    assert status_of(world, "t7")[0] == "quarantined"


def test_another_attestation_key_is_refused(world: World, swtpm: Swtpm, tmp_path: Path) -> None:
    dev = tpm_device(world, swtpm, "t8")
    with running_swtpm(tmp_path / "other-tpm") as other:
        pem = TpmAttestor(other.tcti).ak_public_pem()
    status, data = request(
        world,
        dev,
        "POST",
        "/api/v1/device/attestation-key",
        json.dumps({"public_pem": pem}).encode(),
    )
    assert status == 403 and "already registered another attestation key" in error(data)
    assert status_of(world, "t8")[2] == ["another key was offered"]


def test_renewal_of_a_tpm_device_needs_an_attested_check_in_just_before(
    world: World, swtpm: Swtpm
) -> None:
    dev = tpm_device(world, swtpm, "t9")
    late = dt.datetime.now(dt.UTC) + dt.timedelta(hours=17)
    with pytest.raises(AccessDeniedError, match="has not checked in with this certificate"):
        renew_if_due(dev.paths, dev.config, key_store=Unsafe.FILE_DEVICE_KEY, now=late)
    dev.checkin()
    old = dev.paths.device_cert.read_bytes()
    renew_if_due(dev.paths, dev.config, key_store=Unsafe.FILE_DEVICE_KEY, now=late)
    assert dev.paths.device_cert.read_bytes() != old
    # The new certificate has not checked in yet: the agent checks in again with it.
    assert dev.checkin().attested


def test_the_agent_of_a_tpm_device_checks_in_renews_and_checks_in_again(
    world: World, swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = tpm_device(world, swtpm, "t10")
    old = dev.paths.device_cert.read_bytes()
    # Renewal due now (it is due when less than this fraction of the lifetime is left).
    monkeypatch.setattr("otaguard.agent.identity.RENEW_WHEN_LEFT", 1.01)
    assert dev.update().outcome == "up-to-date"
    assert dev.paths.device_cert.read_bytes() != old
    with fleet(world) as client:
        history = client.checkins("t10").checkins
        certs = client.show("t10").cert_serials
    # Attested check-in with the old certificate, renewal, attested check-in with the new.
    assert [(c.outcome, c.attested) for c in history] == [("accepted", True)] * 2
    assert len(certs) == 2
