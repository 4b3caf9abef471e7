"""Vulnerability response: the store on SQLite and PostgreSQL, then the acceptance on a real
server with real devices -- an advisory naming a component of one release lists exactly the
devices running it; after a security release goes out and they update, the report shows
them patched with their time to patch."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from conftest import World
from db_support import ENGINES
from otaguard.cli import main
from otaguard.cli._cli import out as cli_out
from otaguard.model.errors import AccessDeniedError
from otaguard.model.sbom import Component
from otaguard.model.vuln import parse_vulnerabilities
from otaguard.server.storage.checkins import checkins_table
from otaguard.server.storage.devices import devices_table
from otaguard.server.storage.sboms import SQLSbomStore
from otaguard.server.storage.vulns import SQLVulnStore
from otaguard.server.vuln_client import VulnClient
from otaguard.sim.sbom import VULNERABLE_OPENSSL

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
IMG100, IMG110 = "1" * 64, "2" * 64
VULN_ID = "OSV-2026-OPENSSL"

#: the advisory of the acceptance: OpenSSL 3.0.0 up to 3.0.14 (the simulated 1.0.0 ships
#: 3.0.13, 1.1.0 ships 3.0.15)
OSV_RECORD = {
    "schema_version": "1.6.0",
    "id": VULN_ID,
    "modified": "2026-11-20T00:00:00Z",
    "summary": "OpenSSL: buffer over-read",
    "aliases": ["CVE-2024-5535"],
    "affected": [
        {
            "package": {"purl": "pkg:generic/openssl"},
            "ranges": [
                {"type": "SEMVER", "events": [{"introduced": "3.0.0"}, {"fixed": "3.0.14"}]}
            ],
        }
    ],
}


def test_store_keeps_first_import_time_and_reads_the_index(db_engine: Engine) -> None:
    store = SQLVulnStore(db_engine)
    (vuln,) = parse_vulnerabilities(json.dumps(OSV_RECORD).encode())
    assert store.put(vuln, actor="op", now=NOW)
    later = NOW + dt.timedelta(days=1)
    changed = json.loads(json.dumps(OSV_RECORD))
    changed["summary"] = "updated"
    (again,) = parse_vulnerabilities(json.dumps(changed).encode())
    assert not store.put(again, actor="op2", now=later), "same id: replaced, not new"
    stored = store.get(VULN_ID)
    assert stored is not None
    assert stored.vuln.summary == "updated" and stored.imported_at == NOW
    assert stored.imported_by == "op"
    assert [s.vuln.id for s in store.all()] == [VULN_ID]
    assert store.get("nope") is None

    sboms = SQLSbomStore(db_engine)
    for target, image, openssl in (("fw-1.0.0.img", IMG100, "3.0.13"),
                                   ("fw-1.1.0.img", IMG110, "3.0.15")):  # fmt: skip
        sboms.add_release(
            target=target, version=target[3:8], image_sha256=image, sbom_sha256="a" * 64,
            components=[
                Component("openssl", openssl, f"pkg:generic/openssl@{openssl}", "library"),
                Component("zlibAx", "1", "pkg:generic/zlibAx@1", "library"),
            ],
            now=NOW,
        )  # fmt: skip
    assert sorted(c.version or "" for c in store.components("pkg:generic/openssl", "openssl")) == [
        "3.0.13", "3.0.15",
    ]  # fmt: skip
    # "_" is a LIKE wildcard: escaped, so a package zlib_x does not match zlibAx
    assert [c.purl for c in store.components("pkg:generic/zlib_x", "zlib_x")] == []
    assert [c.purl for c in store.components("pkg:generic/zlibAx", "-")] == [
        "pkg:generic/zlibAx@1"
    ] * 2
    assert {r.target for r in store.releases()} == {"fw-1.0.0.img", "fw-1.1.0.img"}

    with db_engine.begin() as conn:
        for serial in ("d1", "d2"):
            conn.execute(insert(devices_table).values(
                serial=serial, hardware_id="hw", status="enrolled", reason="",
                created_at=NOW, updated_at=NOW))  # fmt: skip
        for serial, image, minute, outcome in (
            ("d1", IMG100, 1, "accepted"), ("d1", IMG110, 2, "quarantined"),
            ("d1", IMG110, 3, "accepted"), ("d2", IMG110, 1, "accepted"),
        ):  # fmt: skip
            conn.execute(insert(checkins_table).values(
                serial=serial, cert_serial="c", time=NOW + dt.timedelta(minutes=minute),
                device_time="", running_version="v", target="t", boot_sha256=image,
                attested=False, outcome=outcome, detail="", manifest=b"{}"))  # fmt: skip
    points, cut = store.history([IMG100])
    assert not cut
    # d2 never booted 1.0.0; a refused (quarantined) check-in is not history
    assert [(p.serial, p.boot_sha256, p.time.minute) for p in points] == [
        ("d1", IMG100, 1), ("d1", IMG110, 3),
    ]  # fmt: skip


def _cli(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    token = tmp_path / "token"
    token.write_text(world.server.operator_token)
    monkeypatch.setenv("OTAGUARD_SERVER", world.server.base_url)
    monkeypatch.setenv("OTAGUARD_CA", str(world.server.ca_cert))
    monkeypatch.setattr(cli_out, "width", 200)
    return ["--token-file", str(token)]


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_vulnerable_devices_listed_exactly_then_patched_with_time_to_patch(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = _cli(world, tmp_path, monkeypatch)
    old = world.releases["1.0.0"].path
    # Two devices run 1.0.0 (its SBOM lists OpenSSL 3.0.13); each checks in.
    a, b = world.device("a"), world.device("b")
    for dev in (a, b):
        dev.checkin()

    advisory = tmp_path / "openssl.osv.json"
    advisory.write_text(json.dumps(OSV_RECORD))
    assert main(["vuln", "import", str(advisory), *token]) == 0
    assert f"{VULN_ID}: imported" in capsys.readouterr().out

    assert main(["vuln", "affected", VULN_ID, "--json", *token]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(r["target"], r["component_version"]) for r in found["releases"]] == [
        (old, VULNERABLE_OPENSSL)
    ]
    assert sorted(d["serial"] for d in found["devices"]) == sorted(
        [a.config.serial, b.config.serial]
    )
    assert found["fixed_by"] == []

    # The security release: OpenSSL 3.0.15. A third device ships with it from the factory.
    new = world.release("1.1.0", security=True).path
    c = world.device("c", version="1.1.0")
    c.checkin()
    assert main(["vuln", "affected", VULN_ID, *token]) == 0
    text = capsys.readouterr().out
    assert "fixed by: 1.1.0 (3.0.15)" in text
    assert "1 release(s) affected, 2 device(s) running them" in text
    assert main(["vuln", "affected", VULN_ID, "--json", *token]) == 0
    devices = json.loads(capsys.readouterr().out)["devices"]
    assert sorted(d["serial"] for d in devices) == sorted([a.config.serial, b.config.serial]), (
        "c runs the fixed release: not affected"
    )
    assert all(d["target"] == old for d in devices)

    # a updates (and reports what it booted at its next check-in); b does not yet.
    assert a.update().to_version == "1.1.0"
    a.checkin()
    with VulnClient(
        server_url=world.server.base_url, ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    ) as client:  # fmt: skip
        now = client.affected(VULN_ID)
        assert [d.serial for d in now.devices] == [b.config.serial]
        assert [f.target for f in now.fixed_by] == [new]
        rows, truncated = client.report()
    assert not truncated
    by_serial = {r.serial: r for r in rows}
    assert set(by_serial) == {a.config.serial, b.config.serial}
    imported = world.server.app.state.vulns.listed()[0].imported_at
    pa, pb = by_serial[a.config.serial], by_serial[b.config.serial]
    assert pa.affected_since == imported, "ran 1.0.0 before the import: exposed since it"
    assert pa.patched_at is not None and pa.patched_to == "1.1.0"
    assert pa.time_to_patch_seconds == pytest.approx((pa.patched_at - imported).total_seconds())
    assert pa.time_to_patch_seconds > 0
    assert pb.patched_at is None and pb.time_to_patch_seconds is None

    assert b.update().to_version == "1.1.0"
    b.checkin()
    assert main(["vuln", "report", "--format", "csv", *token]) == 0
    report = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted((r["serial"], r["status"], r["patched_to"]) for r in report) == [
        (a.config.serial, "patched", "1.1.0"), (b.config.serial, "patched", "1.1.0"),
    ]  # fmt: skip
    assert all(float(r["time_to_patch_seconds"]) > 0 for r in report)
    assert main(["vuln", "report", "--format", "json", *token]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {e["serial"] for e in doc["exposures"]} == {a.config.serial, b.config.serial}
    assert main(["vuln", "affected", VULN_ID, "--json", *token]) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == []

    # an unknown id is one line and exit 2
    assert main(["vuln", "affected", "OSV-NOPE", *token]) == 2
    assert "no vulnerability 'OSV-NOPE' was imported" in capsys.readouterr().err


def test_import_needs_the_operator_role_and_is_audited(world: World, tmp_path: Path) -> None:
    from otaguard.server.ops_client import OpsClient

    assert world.server.ca_cert is not None
    with OpsClient(
        server_url=world.server.base_url, ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    ) as admin:  # fmt: skip
        viewer = admin.add_operator("watcher", "viewer").token
        audit_before = len(list(admin.audit()))
    with (
        VulnClient(
            server_url=world.server.base_url, ca_cert=world.server.ca_cert, token=viewer
        ) as client,
        pytest.raises(AccessDeniedError, match=r"vuln\.import needs operator or above"),
    ):
        client.import_document(OSV_RECORD)
    with VulnClient(
        server_url=world.server.base_url, ca_cert=world.server.ca_cert, token=viewer
    ) as client:
        assert client.report() == ([], False)  # a viewer reads
    with OpsClient(
        server_url=world.server.base_url, ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    ) as admin:  # fmt: skip
        refused = [e for e in list(admin.audit())[audit_before:] if e.action == "vuln.import"]
        assert [e.result.split(":")[0] for e in refused] == ["refused 403"]
        with VulnClient(
            server_url=world.server.base_url, ca_cert=world.server.ca_cert,
            token=world.server.operator_token,
        ) as client:  # fmt: skip
            assert client.import_document(OSV_RECORD) == [(VULN_ID, True)]
            # the server parses again: a bad document never reaches the store
            from otaguard.model.errors import OperatorError

            with pytest.raises(OperatorError, match="no affected package"):
                client.import_document(OSV_RECORD | {"affected": []})
        done = [e for e in admin.audit() if e.action == "vuln.import" and e.result == "ok"]
        assert [e.target for e in done] == [VULN_ID]


def test_server_refuses_hostile_bodies_and_reads_cyclonedx_vex(world: World) -> None:
    """The server parses the body itself: too large is 413 before it is read whole, too
    deep is refused naming the problem; a VEX document's ``vers:`` range matches 1.0.0."""
    from otaguard.model.vuln import MAX_VULN_FILE_BYTES

    assert world.server.ca_cert is not None
    with VulnClient(
        server_url=world.server.base_url, ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    ) as client:  # fmt: skip
        http = client._client
        headers = {"Content-Type": "application/json"}
        status, _, data = http.request(
            "POST", "/api/v1/vulns", body=b" " * (MAX_VULN_FILE_BYTES + 1), headers=headers
        )
        assert status == 413 and b"exceeds" in data
        status, _, data = http.request(
            "POST", "/api/v1/vulns", body=b"[" * 5000 + b"]" * 5000, headers=headers
        )
        assert status == 400 and b"nested deeper than 32 levels" in data
        assert client.report() == ([], False), "nothing stored"

        vex = {
            "bomFormat": "CycloneDX", "specVersion": "1.6", "version": 1,
            "vulnerabilities": [{
                "id": "CVE-2024-5535", "affects": [{
                    "ref": "pkg:generic/openssl",
                    "versions": [{"range": "vers:generic/>=3.0.0|<3.0.14", "status": "affected"}],
                }],
            }],
        }  # fmt: skip
        assert client.import_document(vex) == [("CVE-2024-5535", True)]
        found = client.affected("CVE-2024-5535")
    assert [(r.target, r.component_version) for r in found.releases] == [
        (world.releases["1.0.0"].path, VULNERABLE_OPENSSL)
    ]
