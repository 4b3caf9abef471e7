"""The director end to end: real server, real mutual TLS, devices with a director root.

Uptane full verification on the device: it installs only what the director instructs at
its check-in *and* the image repository lists identically; a compromised director (its
real online key, used by an attacker who took the server) cannot make it install
anything else, and the device reports the attempt at its next check-in, which the
server surfaces as an alert.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Final

import pytest
from securesystemslib.signer import CryptoSigner
from sqlalchemy import event

from conftest import World, start_world
from db_support import ENGINES, fresh_database
from otaguard.agent import Device
from otaguard.model.errors import (
    DirectorMetadataError,
    DirectorMismatchError,
    DowngradeError,
)
from otaguard.server.client import FleetClient
from otaguard.server.storage import upgrade_database
from otaguard.sim.director_attacks import CompromisedDirector


@pytest.fixture
def dworld(tmp_path: Path) -> Iterator[World]:
    """A world whose server runs a director; 1.0.0 published."""
    w = start_world(tmp_path, director=True)
    try:
        w.release("1.0.0")
        yield w
    finally:
        w.server.stop()


def _fleet(w: World) -> FleetClient:
    return FleetClient(
        server_url=w.server.base_url, ca_cert=w.server.ca_cert, token=w.server.operator_token
    )


def _running(dev: Device) -> str:
    booted = dev.status().booted
    assert booted is not None
    return booted.version


def _alerts(w: World, serial: str) -> list[tuple[str, str]]:
    with _fleet(w) as f:
        return [(kind, detail) for _, kind, detail in f.checkins(serial).alerts]


def _attacker(w: World) -> CompromisedDirector:
    return CompromisedDirector(w.server.app.state.director, w.server.data_dir)


def test_update_driven_by_the_director(dworld: World) -> None:
    """A security release goes out without a rollout (ADR 0011), installed end to end."""
    dev = dworld.device("d1")
    assert dev.has_director
    dworld.release("1.1.0", security=True)
    result = dev.update()
    assert (result.outcome, result.to_version) == ("updated", "1.1.0")
    assert _running(dev) == "1.1.0"
    # Now the director says "none" (nothing newer): the device stays.
    assert dev.update().outcome == "up-to-date"


def test_the_director_chooses_not_the_device(dworld: World) -> None:
    """Assigned 1.1.0 while 1.2.0 is published: the device installs 1.1.0, not the newest."""
    dev = dworld.device("d1")
    dworld.release("1.1.0")
    dworld.release("1.2.0")
    with _fleet(dworld) as f:
        assert f.assign("d1", version="1.1.0") == ("release", "1.1.0")
    assert dev.update().to_version == "1.1.0"
    assert _running(dev) == "1.1.0"


def test_device_told_none_stays(dworld: World) -> None:
    """Hold: the director instructs no image; a newer release is published, nothing installs."""
    dev = dworld.device("d1")
    with _fleet(dworld) as f:
        assert f.assign("d1", version=None, hold=True) == ("hold", "")
    dworld.release("1.1.0", security=True)
    assert dev.update().outcome == "up-to-date"
    assert _running(dev) == "1.0.0"
    with _fleet(dworld) as f:
        assert f.assign("d1", version=None) == ("default", "")
    assert dev.update().to_version == "1.1.0"


def _refused_and_reported(
    w: World, devs: list[Device], error: type[Exception], flag: str, *, match: str
) -> None:
    for dev in devs:
        with pytest.raises(error, match=match):
            dev.update()
        assert _running(dev) == "1.0.0"
    for dev in devs:
        dev.checkin()  # the next check-in carries the flag in the signed manifest
        alerts = _alerts(w, dev.config.serial)
        assert ("attack", f"device refused: {flag}") in alerts, alerts


def test_compromised_director_names_an_image_absent_from_the_image_repository(
    dworld: World,
) -> None:
    devs = [dworld.device(f"d{i}") for i in range(3)]
    evil = dworld.tmp / "evil.img"
    evil.write_bytes(b"malware" * 1000)
    attacker = _attacker(dworld)
    attacker.instruct(
        name="evil-9.9.9.img",
        length=evil.stat().st_size,
        sha256=hashlib.sha256(evil.read_bytes()).hexdigest(),
    )
    _refused_and_reported(
        dworld,
        devs,
        DirectorMismatchError,
        "director-image-mismatch",
        match="the image repository lacks",
    )


def test_compromised_director_names_a_listed_image_with_another_hash(dworld: World) -> None:
    devs = [dworld.device(f"d{i}") for i in range(3)]
    rel = dworld.release("1.1.0")
    attacker = _attacker(dworld)
    attacker.instruct(name=rel.path, length=rel.length, sha256="ab" * 32, version="1.1.0")
    _refused_and_reported(
        dworld, devs, DirectorMismatchError, "director-image-mismatch", match="hashes of .* differ"
    )


def test_compromised_director_names_a_listed_image_with_another_length(dworld: World) -> None:
    dev = dworld.device("d1")
    rel = dworld.release("1.1.0")
    _attacker(dworld).instruct(
        name=rel.path, length=rel.length + 1, sha256=rel.sha256, version="1.1.0"
    )
    _refused_and_reported(
        dworld, [dev], DirectorMismatchError, "director-image-mismatch", match="bytes"
    )


def test_compromised_director_instructs_a_downgrade(dworld: World) -> None:
    """A validly listed but older image, instructed by the real key: a refused downgrade."""
    dworld.release("1.1.0")
    dev = dworld.device("d1", version="1.1.0")
    old = dworld.releases["1.0.0"]
    _attacker(dworld).instruct(
        name=old.path, length=old.length, sha256=old.sha256, version="1.0.0", security_counter=0
    )
    # Refused at selection, before a byte is downloaded (the install's floor check at
    # arming is the second line of defence, ADR 0003).
    with pytest.raises(DowngradeError, match=r"version 1\.0\.0 < running 1\.1\.0"):
        dev.update()
    assert _running(dev) == "1.1.0"
    dev.checkin()
    assert ("attack", "device refused: downgrade") in _alerts(dworld, "d1")


def test_replayed_instruction_of_an_earlier_checkin_is_refused(dworld: World) -> None:
    """An instruction captured at one check-in is worthless at the next (nonce binding)."""
    dev = dworld.device("d1")
    dworld.release("1.1.0")
    attacker = _attacker(dworld)
    attacker.watch()
    with _fleet(dworld) as f:
        f.assign("d1", version=None, hold=True)
    dev.update()  # honest "none", captured
    with _fleet(dworld) as f:
        f.assign("d1", version=None)
    assert attacker.captured
    attacker.replay(attacker.captured[-1])
    with pytest.raises(DirectorMetadataError, match="nonce differs"):
        dev.update()
    dev.checkin()
    assert ("attack", "device refused: director-metadata-invalid") in _alerts(dworld, "d1")


def test_instruction_for_another_device_is_refused(dworld: World) -> None:
    dev1, dev2 = dworld.device("d1"), dworld.device("d2")
    dworld.release("1.1.0", security=True)
    attacker = _attacker(dworld)
    attacker.watch()
    assert dev1.update().to_version == "1.1.0"
    attacker.replay(attacker.captured[-1])
    with pytest.raises(DirectorMetadataError, match="not for this device"):
        dev2.update()
    assert _running(dev2) == "1.0.0"


def test_instruction_signed_by_a_non_director_key_is_refused(dworld: World) -> None:
    """The server's snapshot/timestamp key, or any other: not the director root's targets key."""
    dev = dworld.device("d1")
    rel = dworld.release("1.1.0")
    from otaguard.server.online import load_online_signer

    for signer in (load_online_signer(dworld.server.data_dir), CryptoSigner.generate_ed25519()):
        _attacker(dworld).instruct(
            name=rel.path, length=rel.length, sha256=rel.sha256, version="1.1.0", signer=signer
        )
        with pytest.raises(DirectorMetadataError, match="not signed by a threshold"):
            dev.update()
        assert _running(dev) == "1.0.0"


def test_expired_instruction_is_refused(dworld: World) -> None:
    dev = dworld.device("d1")
    rel = dworld.release("1.1.0")
    _attacker(dworld).instruct(
        name=rel.path, length=rel.length, sha256=rel.sha256, version="1.1.0", expired=True
    )
    with pytest.raises(DirectorMetadataError, match="expired"):
        dev.update()
    assert _running(dev) == "1.0.0"


def test_fleet_assign_and_show_through_the_cli(dworld: World) -> None:
    """The operator's CLI: assign, then fleet show prints the ALERT a refusal raised."""
    dev = dworld.device("d1")
    env = {
        "OTAGUARD_SERVER": dworld.server.base_url,
        "OTAGUARD_CA": str(dworld.server.ca_cert),
        "OTAGUARD_OPERATOR_TOKEN": dworld.server.operator_token,
        "PATH": "/usr/bin:/bin",
    }
    run = subprocess.run(
        [*dworld.cli(), "fleet", "assign", "d1", "--hold"],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "nothing (hold)" in run.stdout
    rel = dworld.release("1.1.0")
    _attacker(dworld).instruct(name=rel.path, length=rel.length, sha256="cd" * 32)
    with pytest.raises(DirectorMismatchError):
        dev.update()
    dev.checkin()
    show = subprocess.run(
        [*dworld.cli(), "fleet", "show", "d1"],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert show.returncode == 0, show.stderr
    assert "ALERT" in show.stdout
    assert "director-image-mismatch" in show.stdout
    assert "director: hold (instructs no update)" in show.stdout
    bad = subprocess.run(
        [*dworld.cli(), "fleet", "assign", "d1", "--release", "not-a-version"],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


def test_server_without_director_is_refused_by_a_director_device(
    dworld: World, tmp_path: Path
) -> None:
    """A device with a director root refuses a check-in answer without an instruction."""
    plain = start_world(tmp_path / "plain")
    try:
        plain.release("1.0.0")
        plain.release("1.1.0")
        assert dworld.director_root is not None
        dev = plain.device("p1", director_root=dworld.director_root)
        with pytest.raises(DirectorMetadataError, match="no director instruction"):
            dev.update()
        assert _running(dev) == "1.0.0"
    finally:
        plain.server.stop()


def test_forged_image_is_reported_and_surfaced_in_the_server_log(
    dworld: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The director names a listed image whose blob the server altered: hash mismatch at
    download, flag ``forged-image``, an ALERT line in the server's log and an alert."""
    from otaguard.model.errors import VerificationError
    from otaguard.sim.attacks import CompromisedServer

    dev = dworld.device("d1")
    rel = dworld.release("1.1.0", security=True)
    attacker = CompromisedServer(dworld.server.data_dir)
    try:
        attacker.tamper_blob(rel.path)
    finally:
        attacker.close()
    with pytest.raises(VerificationError, match="download"):
        dev.update()
    assert _running(dev) == "1.0.0"
    caplog.clear()
    with caplog.at_level("ERROR", logger="otaguard.server.checkin"):
        dev.checkin()
    assert any(
        "ALERT device d1 reports refused attacks: forged-image" in r.getMessage()
        for r in caplog.records
    )
    assert ("attack", "device refused: forged-image") in _alerts(dworld, "d1")
    # Reported once: the acceptance cleared the flag, the next check-in carries none.
    dev.checkin()
    assert _alerts(dworld, "d1").count(("attack", "device refused: forged-image")) == 1


def _offline_root_signers(w: World) -> list[object]:
    """The director's offline root keys, unlocked as the offline machine would."""
    from tuf.api.metadata import Metadata, Root

    from conftest import PASSPHRASE
    from otaguard.crypto.signers import load_signer, resolve_key_uri

    assert w.director_root is not None
    root = Metadata[Root].from_bytes(w.director_root.read_bytes()).signed
    config = json.loads((w.tmp / "director" / "otaguard-director.json").read_text())
    return [
        load_signer(
            resolve_key_uri(ref["uri"], w.tmp / "director-keys"),
            root.keys[ref["keyid"]],
            name=ref["name"],
            secrets=lambda _name: PASSPHRASE,
        )
        for ref in config["keys"]
    ]


def test_director_root_rotation_is_served_and_followed(
    dworld: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A new director root (new root key), signed offline by the old and the new keys and
    carried to the server: served without a restart, followed and kept by the device; a
    rogue next version signed by neither is refused by the server and never served."""
    from tuf.api.metadata import Metadata, Root

    dev = dworld.device("d1")
    assert dworld.director_root is not None
    md = Metadata[Root].from_bytes(dworld.director_root.read_bytes())
    new_key = CryptoSigner.generate_ed25519()
    for keyid in list(md.signed.roles["root"].keyids):
        md.signed.revoke_key(keyid, "root")
    md.signed.add_key(new_key.public_key, "root")
    md.signed.roles["root"].threshold = 1
    # one Ed25519 key cannot keep the hybrid policy (ADR 0014); the old root keys, an
    # Ed25519 and an ML-DSA one, sign: that is what may drop it
    md.signed.roles["root"].unrecognized_fields.pop("x-otaguard-hybrid")
    md.signed.version = 2
    md.signatures.clear()
    for signer in [*_offline_root_signers(dworld), new_key]:
        md.sign(signer, append=True)  # type: ignore[arg-type]
    meta = dworld.tmp / "director" / "metadata"
    (meta / "2.root.json").write_bytes(md.to_bytes())
    rogue = Metadata[Root].from_bytes(md.to_bytes())
    rogue.signed.version = 3
    rogue.signatures.clear()
    rogue.sign(CryptoSigner.generate_ed25519())
    (meta / "3.root.json").write_bytes(rogue.to_bytes())

    dworld.release("1.1.0", security=True)
    assert dev.update().to_version == "1.1.0"
    trusted = Metadata[Root].from_bytes(dev.paths.director_root.read_bytes())
    assert trusted.signed.version == 2
    assert "director root rotation refused" in caplog.text
    # The device trusts version 2 from now on: the next update verifies against it.
    assert dev.update().outcome == "up-to-date"


@pytest.mark.parametrize("answer", [b"not json", b"{}", b'{"signed": [], "signatures": 5}'])
def test_hostile_instruction_is_a_one_line_cli_error(dworld: World, answer: bytes) -> None:
    """Garbage in place of the instruction: the real `agent update` exits 3 with one line."""
    dev = dworld.device("d1")
    dworld.release("1.1.0")
    _attacker(dworld).replay(answer)
    run = subprocess.run(
        [*dworld.cli(), "agent", str(dev.paths.root), "update"],
        capture_output=True, text=True, check=False, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert run.returncode == 3, run.stderr
    # log records (timestamp, level) and warnings aside, the error is one line
    lines = [
        x for x in run.stderr.splitlines()
        if x and not x.lower().startswith("warning") and " WARNING " not in x
    ]  # fmt: skip
    assert len(lines) == 1 and lines[0].startswith("director instruction refused:"), run.stderr
    assert _running(dev) == "1.0.0"


def test_director_routes_and_answer_are_in_the_openapi_schema(dworld: World) -> None:
    spec = dworld.server.app.openapi()
    assert "/api/v1/device/director/{version}.root.json" in spec["paths"]
    assert {"get", "put", "delete"} <= set(spec["paths"]["/api/v1/devices/{serial}/assignment"])
    assert "director_targets" in spec["components"]["schemas"]["CheckinBody"]["properties"]


def test_assign_on_a_server_without_director_says_so(world: World) -> None:
    from otaguard.model.errors import OperatorError

    world.device("p1")
    with _fleet(world) as f, pytest.raises(OperatorError, match="runs no director"):
        f.assign("p1", version="1.0.0")


def _director_world(
    stack: ExitStack, engine: str, request: pytest.FixtureRequest, tmp_path: Path
) -> World:
    """A world with a director on ``engine`` (SQLite: the embedded database, as the world
    fixture runs it; PostgreSQL: a fresh database, migrated), stopped with ``stack``."""
    url = None
    if engine != "sqlite":
        url = stack.enter_context(fresh_database(request.config, engine, tmp_path))
        upgrade_database(url)
    w = start_world(tmp_path, director=True, database_url=url)
    stack.callback(w.server.stop)
    return w


@pytest.mark.parametrize("engine", ENGINES)
def test_a_check_in_and_its_answer_are_one_connection(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """On PostgreSQL the check-in's record and the director's answer (assignment, policy)
    share one pooled connection and one transaction (ADR 0019), and a device that kept the
    nonce its last check-in handed out makes no nonce request (ADR 0036): one connection
    per check-in (it was three: the nonce, the check-in, the answer's own unit).
    On SQLite the answer keeps its own unit (one file lock; ADR 0019). The device still
    verifies and installs what it is told."""
    with ExitStack() as stack:
        w = _director_world(stack, engine, request, tmp_path)
        w.release("1.0.0")
        dev = w.device("one-unit")
        dev.checkin()  # untimed first contact: caches filled
        w.release("1.1.0", security=True)
        db = w.server.app.state.checkins._engine
        checkouts: list[str] = []

        def seen(*_: object) -> None:
            name = threading.current_thread().name
            if name.startswith("checkin"):  # the lean path's threads, not periodic tasks
                checkouts.append(name)

        event.listen(db, "checkout", seen)
        try:
            dev.checkin()
        finally:
            event.remove(db, "checkout", seen)
        # one request (the nonce the first check-in handed out, ADR 0036): the check-in and
        # its answer (SQLite: the answer apart)
        assert len(checkouts) == (2 if engine == "sqlite" else 1), checkouts
        result = dev.update()
        assert (result.outcome, result.to_version) == ("updated", "1.1.0")


def _statements_of_one_checkin(w: World, dev: Device) -> list[str]:
    """The SQL statements one check-in of ``dev`` runs on the lean path's threads."""
    db = w.server.app.state.checkins._engine
    seen: list[str] = []

    def note(_c: object, _cur: object, statement: str, *_: object) -> None:
        if threading.current_thread().name.startswith("checkin"):
            seen.append(" ".join(statement.split()))

    event.listen(db, "before_cursor_execute", note)
    try:
        dev.checkin()
    finally:
        event.remove(db, "before_cursor_execute", note)
    return seen


@pytest.mark.parametrize("engine", ENGINES)
def test_a_steady_state_check_in_is_two_statements_on_postgresql(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What a check-in of a device that kept its nonce and runs the newest release costs
    the database (ADR 0036): the device's standing (status, certificate issued,
    attestation key); the nonce claim, the record, the health row and the next nonce (on
    PostgreSQL one statement). The policy reads nothing of a device that nothing newer
    is listed for (its groups, opt-out and rollouts cannot change the answer); an answer
    naming nothing to install writes nothing more. The rollout list, the groups' settings
    and the operators' assignments are kept until a write is announced: a server that
    never wrote one creates the announcement file at start (without it every check-in
    read the rollouts table again)."""
    with ExitStack() as stack:
        w = _director_world(stack, engine, request, tmp_path)
        w.release("1.0.0")
        dev = w.device("kept-list")
        dev.checkin()  # first contact: caches filled (the release's first sighting recorded)
        dev.checkin()  # ... and read back
        statements = _statements_of_one_checkin(w, dev)
        tables = [
            "the accept statement" if s.startswith("WITH claimed")
            else next((t for t in _TABLES if f" {t}" in s), s[:40])
            for s in statements
        ]  # fmt: skip
        accept = ["the accept statement"] if engine == "postgresql" else [
            "checkin_nonces", "checkins", "device_health", "checkin_nonces"
        ]  # fmt: skip
        # (SQLite answers in a unit of its own after the commit: another order)
        assert sorted(tables) == sorted(["devices", *accept]), statements
        assert not [s for s in statements if "rollouts" in s or "channel_settings" in s[:40]]


def test_an_instruction_is_noted_on_the_health_row_with_the_answer(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The check-in writes the health row before the director answers; an answer naming an
    image adds it to the row in the same transaction (the silence sweep watches the
    device), and the next answer naming nothing clears it."""
    with ExitStack() as stack:
        w = _director_world(stack, "postgresql", request, tmp_path)
        store = w.server.app.state.monitoring.monitor.store
        w.release("1.0.0")
        dev = w.device("instructed")
        dev.checkin()

        def health() -> tuple[str, str | None]:
            row = store.health(dev.config.serial)
            assert row is not None
            return row.running_version, row.instructed_image

        assert health() == ("1.0.0", None)
        w.release("1.1.0", security=True)
        dev.checkin()
        running, image = health()
        assert running == "1.0.0" and image is not None and "1.1.0" in image
        assert dev.update().to_version == "1.1.0"
        dev.checkin()
        assert health() == ("1.1.0", None)


_TABLES: Final = (
    "director_assignments", "device_health", "checkin_nonces", "checkins", "devices",
    "rollouts", "channel_settings", "release_first_seen",
)  # fmt: skip
