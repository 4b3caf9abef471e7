"""Zero-trust check-in over real mutual TLS: nonce, signed manifest, refusals, window,
measured boot without a TPM (unattested) quarantining a tampered device."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import http.client
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner

from conftest import World, start_world
from db_support import ENGINES
from otaguard.agent import Device
from otaguard.agent.checkin import CHECKIN_PATH, NONCE_PATH, build_manifest
from otaguard.agent.identity import device_signer
from otaguard.agent.install import InstallState
from otaguard.agent.slots import BootEnv, FileSlots
from otaguard.cli import main
from otaguard.crypto.envelope import MAX_ENVELOPE_BYTES, sign_envelope
from otaguard.model.errors import AccessDeniedError
from otaguard.server.client import FleetClient
from otaguard.sim import make_image

TIMESTAMP = "/metadata/timestamp.json"
UNPRINTABLE = "last_result.error holds a control character or an invalid code point"


def fleet(world: World) -> FleetClient:
    return FleetClient(
        server_url=world.server.base_url,
        ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    )


def request(
    world: World, dev: Device, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes]:
    """One request over mutual TLS presenting ``dev``'s certificate."""
    url = urlsplit(world.server.base_url)
    assert world.server.ca_cert is not None
    ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
    ctx.load_cert_chain(str(dev.paths.device_cert), str(dev.paths.device_key))
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def nonce_for(world: World, dev: Device) -> str:
    status, data = request(world, dev, "POST", NONCE_PATH)
    assert status == 200, data
    return str(json.loads(data)["nonce"])


def manifest(dev: Device, nonce: str, *, serial: str | None = None, signer: object = None) -> bytes:
    m = build_manifest(dev.paths, dev.config, nonce=nonce, tpm=None)
    if serial is not None:
        m = dataclasses.replace(m, serial=serial)
    return sign_envelope(signer or device_signer(dev.paths, dev.config), m.to_dict())  # type: ignore[arg-type]


def error(data: bytes) -> str:
    return str(json.loads(data)["error"])


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_a_check_in_is_accepted_recorded_and_shown(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = world.device("c1")
    result = dev.checkin()
    assert result.serial == "c1" and not result.attested
    assert result.boot_sha256 == world.releases["1.0.0"].sha256
    with fleet(world) as client:
        history = client.checkins("c1")
    last = history.checkins[0]
    assert (last.outcome, last.running_version, last.attested) == ("accepted", "1.0.0", False)
    assert last.boot_sha256 == world.releases["1.0.0"].sha256
    assert not history.alerts and not history.attestation_key
    assert main(["fleet", "show", "c1", "--server", world.server.base_url, "--ca",
                 str(world.server.ca_cert), "--token-file",
                 str(world.server.data_dir / "operator-token")]) == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert "last check-in:" in shown and "accepted, running 1.0.0" in shown
    assert "unattested" in shown


def test_metadata_needs_a_recent_check_in_by_this_certificate(world: World) -> None:
    dev = world.device("c2")
    status, data = request(world, dev, "GET", TIMESTAMP)
    assert status == 403
    assert "c2 has not checked in with this certificate in the last 900 s" in error(data)
    dev.checkin()
    assert request(world, dev, "GET", TIMESTAMP)[0] == 200
    # The agent checks in by itself before every update check.
    assert dev.update().outcome == "up-to-date"


@pytest.fixture
def clocked(tmp_path: Path) -> Iterator[tuple[World, list[dt.timedelta]]]:
    skew = [dt.timedelta(0)]
    w = start_world(tmp_path, clock=lambda: dt.datetime.now(dt.UTC) + skew[0])
    try:
        w.release("1.0.0")
        yield w, skew
    finally:
        w.server.stop()


def test_the_check_in_window_closes_and_nonces_expire(
    clocked: tuple[World, list[dt.timedelta]],
) -> None:
    world, skew = clocked
    dev = world.device("c3")
    dev.checkin()
    assert request(world, dev, "GET", TIMESTAMP)[0] == 200
    nonce = nonce_for(world, dev)
    skew[0] = dt.timedelta(minutes=16)
    status, data = request(world, dev, "GET", TIMESTAMP)
    assert status == 403 and "has not checked in" in error(data)
    status, data = request(world, dev, "POST", CHECKIN_PATH, manifest(dev, nonce))
    assert status == 403
    assert (
        error(data)
        == "access denied: check-in refused: the nonce has expired (ask for a fresh one)"
    )


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_a_replayed_check_in_is_refused(world: World, caplog: pytest.LogCaptureFixture) -> None:
    dev = world.device("c4")
    signed = manifest(dev, nonce_for(world, dev))
    assert request(world, dev, "POST", CHECKIN_PATH, signed)[0] == 200
    with caplog.at_level(logging.WARNING, logger="otaguard.server"):
        status, data = request(world, dev, "POST", CHECKIN_PATH, signed)
    assert status == 403
    assert error(data) == "access denied: check-in refused: the nonce was already used (replay)"
    assert "check-in of c4 refused: check-in refused: the nonce was already used" in caplog.text


def test_an_unknown_nonce_is_refused(world: World) -> None:
    dev = world.device("c5")
    status, data = request(world, dev, "POST", CHECKIN_PATH, manifest(dev, "made-up"))
    assert status == 403 and "unknown nonce" in error(data)


def test_the_nonce_of_another_device_is_refused(world: World) -> None:
    a, b = world.device("ca"), world.device("cb")
    stolen = nonce_for(world, a)
    status, data = request(world, b, "POST", CHECKIN_PATH, manifest(b, stolen))
    assert status == 403
    assert error(data) == "access denied: check-in refused: the nonce was issued to another device"
    # Still unused: its own device may spend it.
    assert request(world, a, "POST", CHECKIN_PATH, manifest(a, stolen))[0] == 200


def test_a_manifest_for_another_serial_is_refused(world: World) -> None:
    world.device("cc")
    b = world.device("cd")
    status, data = request(
        world, b, "POST", CHECKIN_PATH, manifest(b, nonce_for(world, b), serial="cc")
    )
    assert status == 403
    assert "the manifest is for device 'cc', the certificate for 'cd'" in error(data)


def test_a_manifest_signed_by_another_key_is_refused(world: World) -> None:
    dev = world.device("ce")
    forger = CryptoSigner(ec.generate_private_key(ec.SECP256R1()))
    status, data = request(
        world, dev, "POST", CHECKIN_PATH, manifest(dev, nonce_for(world, dev), signer=forger)
    )
    assert status == 403
    assert "the signature does not verify with the key of the client certificate" in error(data)
    status, data = request(world, dev, "POST", CHECKIN_PATH, b'{"signed": {}, "signatures": []}')
    assert status == 403 and "exactly one signature" in error(data)


@pytest.mark.parametrize("world", ENGINES, indirect=True)
@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("bad\x00byte", "last_result.error holds a control character or an invalid code point"),
        (
            "forged\nlog line",
            "last_result.error holds a control character or an invalid code point",
        ),
        ("\ud800", "the signed record holds an invalid code point"),
    ],
)
def test_a_manifest_with_unprintable_text_is_refused_and_the_server_goes_on(
    world: World, text: str, cause: str
) -> None:
    """A NUL (PostgreSQL text refuses it), a line break (a forged log line) or a lone
    surrogate (no UTF-8 bytes carry it: a device can only send it JSON-escaped, unsigned)
    in a manifest is refused by name: never a 500, never a failed insert, and the device's
    next honest check-in is accepted."""
    dev = world.device("cu")
    m = build_manifest(dev.paths, dev.config, nonce=nonce_for(world, dev), tpm=None)
    if text == "\ud800":
        m = dataclasses.replace(m, last_result={"outcome": "failed", "error": "SURROGATE"})
        signed = sign_envelope(device_signer(dev.paths, dev.config), m.to_dict()).replace(
            b'"SURROGATE"', b'"\\ud800"'
        )
    else:
        m = dataclasses.replace(m, last_result={"outcome": "failed", "error": text})
        signed = sign_envelope(device_signer(dev.paths, dev.config), m.to_dict())
    status, data = request(world, dev, "POST", CHECKIN_PATH, signed)
    assert status == 403, data
    assert cause in error(data)
    assert request(world, dev, "POST", CHECKIN_PATH, manifest(dev, nonce_for(world, dev)))[0] == 200


def test_the_agent_reports_a_hostile_error_text_cleaned(world: World) -> None:
    """An install error may quote a hostile server: the agent cleans it before signing, so
    the device is never locked out of its own check-ins by what it reports."""
    dev = world.device("cv")
    state = InstallState.load(dev.paths.install_state)
    dataclasses.replace(
        state, last_result={"outcome": "failed", "error": "server said \x00\x1b[31m\ud800"}
    ).save(dev.paths.install_state)
    m = build_manifest(dev.paths, dev.config, nonce="n", tpm=None)
    assert m.last_result["error"] == "server said ??[31m?"
    assert dev.checkin().serial == "cv"


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_quarantine_takes_effect_on_the_next_check_in(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = world.device("cq")
    dev.checkin()
    with fleet(world) as client:
        client.quarantine("cq", "odd traffic")
    with pytest.raises(AccessDeniedError, match="device cq is quarantined: odd traffic"):
        dev.checkin()
    capsys.readouterr()
    assert main(["agent", str(dev.paths.root), "update"]) == 77
    err = capsys.readouterr().err
    assert "check-in nonce request refused (HTTP 403)" in err and "quarantined" in err


def tamper_running_slot(dev: Device, tmp: Path) -> str:
    """The attacker rewrites the running slot AND its recorded digest, so boot accepts it."""
    evil = make_image(tmp / "evil.img", size=1024 * 1024, seed="evil")
    env = BootEnv.load(dev.paths.bootenv)
    slot = env.primary
    FileSlots(dev.paths.slots).write(slot, evil)
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()
    image = env.slots[slot]
    assert image is not None
    env.slots[slot] = dataclasses.replace(image, sha256=digest, length=evil.stat().st_size)
    env.save(dev.paths.bootenv)
    return digest


def test_acceptance_a_tampered_boot_quarantines_the_device_unattested(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = world.device("tampered")
    dev.checkin()
    digest = tamper_running_slot(dev, tmp_path)
    record = dev.boot()
    assert record.sha256 == digest and not record.recovery  # the bootloader is fooled
    with pytest.raises(AccessDeniedError) as info:
        dev.update()
    assert "device tampered quarantined at check-in" in str(info.value)
    assert f"booted an image with sha256 {digest[:16]}" in str(info.value)
    with fleet(world) as client:
        shown = client.show("tampered")
        history = client.checkins("tampered")
    assert shown.status == "quarantined" and shown.reason.startswith("measured boot: booted")
    assert history.checkins[0].outcome == "quarantined"
    assert history.alerts[0][1] == "measured-boot"
    # And it stays refused: the next check-in is stopped at the nonce request.
    capsys.readouterr()
    assert main(["agent", str(dev.paths.root), "check"]) == 77
    assert "quarantined" in capsys.readouterr().err
    # The operator sees why.
    assert main(["fleet", "show", "tampered", "--server", world.server.base_url, "--ca",
                 str(world.server.ca_cert), "--token-file",
                 str(world.server.data_dir / "operator-token")]) == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert "device tampered: quarantined (measured boot: booted an image" in shown
    assert "last check-in:" in shown and "quarantined, running 1.0.0" in shown
    assert "ALERT" in shown and f"measured-boot: booted an image with sha256 {digest[:16]}" in shown


def test_a_tampered_boot_after_an_update_names_the_target(world: World, tmp_path: Path) -> None:
    dev = world.device("updated")
    world.release("1.1.0")
    assert dev.update().outcome == "updated"
    tamper_running_slot(dev, tmp_path)
    dev.boot()
    with pytest.raises(AccessDeniedError, match=r"but target .*1\.1\.0.* is [0-9a-f]{16}"):
        dev.checkin()


def test_a_corrupt_event_log_is_one_line_and_exit_2(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = world.device("corrupt")
    dev.paths.event_log.write_text('{"events": [{"sha256": "nope"}]}')
    capsys.readouterr()
    assert main(["agent", str(dev.paths.root), "check"]) == 2
    lines = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.strip() and not line.startswith("warning: INSECURE")
    ]
    assert lines == [f"configuration error: the boot event log {dev.paths.event_log} is corrupt"]
    assert main(["agent", str(dev.paths.root), "boot"]) == 2  # the bootloader will not append


def test_the_check_in_routes_are_in_the_openapi_schema(world: World) -> None:
    spec = world.server.app.openapi()
    paths = spec["paths"]
    for p in (
        "/api/v1/device/nonce",
        "/api/v1/device/checkin",
        "/api/v1/device/attestation-key",
        "/api/v1/devices/{serial}/checkins",
    ):
        assert p in paths, p
    checkin = paths["/api/v1/device/checkin"]["post"]
    assert "signed device manifest" in json.dumps(checkin["requestBody"])
    assert "403" in checkin["responses"]
    assert {"NonceBody", "CheckinBody", "CheckinsBody"} <= set(spec["components"]["schemas"])


def _post_chunked(world: World, dev: Device, path: str, chunks: list[bytes]) -> tuple[int, bytes]:
    """A POST whose body is chunked (no Content-Length to refuse it by)."""
    url = urlsplit(world.server.base_url)
    assert world.server.ca_cert is not None
    ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
    ctx.load_cert_chain(str(dev.paths.device_cert), str(dev.paths.device_key))
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=iter(chunks), encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_the_check_in_lean_path_caps_the_manifest_declared_or_streamed(world: World) -> None:
    """The lean path (ADR 0019) answers the check-in in front of the framework and keeps
    its cap: a manifest over MAX_ENVELOPE_BYTES is a 413 with one line, declared or not,
    and the device's next check-in is accepted (nothing was spent or recorded)."""
    dev = world.device("c-cap")
    nonce = nonce_for(world, dev)
    big = b"{" + b" " * MAX_ENVELOPE_BYTES + b"}"
    status, data = request(world, dev, "POST", CHECKIN_PATH, big)
    assert status == 413, data
    assert error(data) == f"the manifest exceeds {MAX_ENVELOPE_BYTES} bytes"
    half = MAX_ENVELOPE_BYTES // 2 + 1
    status, data = _post_chunked(world, dev, CHECKIN_PATH, [b" " * half, b" " * half])
    assert status == 413, data
    assert error(data) == f"the manifest exceeds {MAX_ENVELOPE_BYTES} bytes"
    # The nonce was not spent by the refusals: the real manifest answering it is accepted.
    status, data = request(world, dev, "POST", CHECKIN_PATH, manifest(dev, nonce))
    assert status == 200, data
    assert json.loads(data)["serial"] == "c-cap"


def test_the_check_in_lean_path_answers_as_the_routes_do(world: World) -> None:
    """The nonce and check-in answers carry the routes' fields (the agent parses them), and
    they come from the lean path, not the framework (which tags every response with an
    X-Request-ID); a request without a certificate is refused there with the gate's reason."""
    dev = world.device("c-lean")
    url = urlsplit(world.server.base_url)
    assert world.server.ca_cert is not None
    ctx = ssl.create_default_context(cafile=str(world.server.ca_cert))
    ctx.load_cert_chain(str(dev.paths.device_cert), str(dev.paths.device_key))
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)
    try:
        conn.request("POST", NONCE_PATH)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200 and resp.getheader("x-request-id") is None
        assert set(body) == {"nonce", "expires", "attestation_key_registered"}
        conn.request("POST", CHECKIN_PATH, body=manifest(dev, body["nonce"]))
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        assert resp.status == 200 and resp.getheader("x-request-id") is None
        assert set(answer) == {
            "serial", "time", "attested", "boot_sha256", "valid_for_seconds", "director_targets",
            "next_nonce",
        }  # fmt: skip
        assert set(answer["next_nonce"]) == {"nonce", "expires", "attestation_key_registered"}
        # Another method on the same path is the framework's (405), not the lean path's.
        conn.request("GET", CHECKIN_PATH)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 405 and resp.getheader("x-request-id") is not None
    finally:
        conn.close()
    anon = http.client.HTTPSConnection(
        url.hostname or "",
        url.port,
        context=ssl.create_default_context(cafile=str(world.server.ca_cert)),
        timeout=10,
    )
    try:
        anon.request("POST", NONCE_PATH)
        resp = anon.getresponse()
        data = resp.read()
        assert resp.status == 403
        assert "a client certificate is required" in error(data)
    finally:
        anon.close()


# --- The nonce for the next check-in (ADR 0036) -------------------------------------------


def test_an_accepted_check_in_hands_out_the_next_nonce_valid_for_a_day(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The next check-in is one request with the kept nonce; a day later the kept nonce
    has expired: the agent asks for a fresh one, and the check-in still succeeds."""
    skew = [dt.timedelta(0)]
    # device certificates for a week: the days skipped here must not expire them
    world = start_world(
        tmp_path,
        clock=lambda: dt.datetime.now(dt.UTC) + skew[0],
        device_cert_lifetime=dt.timedelta(days=7),
    )
    try:
        world.release("1.0.0")
        _next_nonce_for_a_day(world, skew, caplog)
    finally:
        world.server.stop()


def _next_nonce_for_a_day(
    world: World, skew: list[dt.timedelta], caplog: pytest.LogCaptureFixture
) -> None:
    dev = world.device("n1")
    dev.checkin()
    kept = json.loads(dev.paths.next_nonce.read_bytes())
    assert dev.paths.next_nonce.stat().st_mode & 0o077 == 0  # the device's own
    # issued for a day, by the server's clock
    expires = dt.datetime.fromisoformat(kept["expires"])
    assert dt.timedelta(hours=23) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=24)
    # Within the day: used, and a new one kept in its place (single use).
    skew[0] = dt.timedelta(hours=23)
    with caplog.at_level(logging.INFO, logger="otaguard"):
        assert dev.checkin().nonce == kept["nonce"]
    assert "asking for a fresh one" not in caplog.text
    second = json.loads(dev.paths.next_nonce.read_bytes())
    assert second["nonce"] != kept["nonce"]
    # Past its day (by the server's clock; the device's clock does not know): refused as
    # expired, and the agent falls back to asking for a fresh nonce.
    skew[0] = dt.timedelta(hours=23 + 25)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="otaguard"):
        result = dev.checkin()
    assert result.nonce != second["nonce"]
    assert "the nonce has expired" in caplog.text and "asking for a fresh one" in caplog.text


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_a_kept_nonce_replayed_from_an_old_copy_is_refused_and_the_agent_recovers(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The device directory restored from a copy (or a power cut after the check-in was
    sent) holds a spent nonce: the server refuses it as a replay, and the agent's next
    check-in asks for a fresh one and is accepted."""
    dev = world.device("n2")
    dev.checkin()
    old = dev.paths.next_nonce.read_bytes()
    dev.checkin()  # spends it
    dev.paths.next_nonce.write_bytes(old)
    with caplog.at_level(logging.INFO, logger="otaguard"):
        result = dev.checkin()
    assert result.nonce != json.loads(old)["nonce"]
    assert "the nonce was already used (replay)" in caplog.text
    assert "asking for a fresh one" in caplog.text


def test_an_unreadable_kept_nonce_is_dropped_and_the_check_in_asks_for_one(
    world: World,
) -> None:
    dev = world.device("n3")
    dev.checkin()
    dev.paths.next_nonce.write_bytes(b"\xff" * 5000)  # not a nonce file, and too long
    dev.checkin()
    assert json.loads(dev.paths.next_nonce.read_bytes())["nonce"]  # a new one kept


def test_a_refusal_that_is_not_about_the_nonce_is_not_retried(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a refused nonce sends the agent back to ask for a fresh one: a quarantined
    device's check-in fails with the quarantine, from the check-in itself."""
    dev = world.device("n4")
    dev.checkin()
    fleet(world).quarantine("n4", reason="stolen")
    with (
        caplog.at_level(logging.INFO, logger="otaguard"),
        pytest.raises(AccessDeniedError, match=r"^check-in refused .*quarantined"),
    ):
        dev.checkin()
    assert "asking for a fresh one" not in caplog.text
    assert not dev.paths.next_nonce.exists()  # taken out before use, single use
