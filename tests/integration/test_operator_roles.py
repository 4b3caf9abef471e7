# The role and input cases are tables, one case per line.
# ruff: noqa: E501
"""Operator tokens, roles and the audit log, through the real CLI and a real HTTPS server."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3

from conftest import HW, World, start_world
from otaguard.cli import main
from otaguard.server.client import FleetClient

ROLES = ("viewer", "operator", "release-manager", "admin")


# Log lines of the in-process server, which share stderr with the CLI in these tests.
_SERVER_LOG = re.compile(r"(DEBUG|INFO|WARNING|ERROR) (otaguard\.server|uvicorn)")


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process: exit code, stdout, and stderr without the server's log."""
    pkg = logging.getLogger("otaguard")
    # main() adds a stderr handler per call, here and in other test modules; drop them
    # all, before and after, so the server thread never logs into a captured stream
    # that is closed by then ("--- Logging error ---" on stderr).
    for h in list(pkg.handlers):
        pkg.removeHandler(h)
    try:
        code = main(argv)
    finally:
        for h in list(pkg.handlers):
            pkg.removeHandler(h)
    captured = capsys.readouterr()
    err = "".join(line for line in captured.err.splitlines(keepends=True)
                  if not _SERVER_LOG.match(line))  # fmt: skip
    return code, captured.out, err


@dataclass
class Ops:
    """A running server, a token file per role, and a raw HTTPS client."""

    world: World
    token_files: dict[str, Path]
    http: urllib3.PoolManager

    @property
    def bootstrap(self) -> Path:
        return self.world.server.data_dir / "operator-token"

    def opts(self, who: str = "bootstrap") -> list[str]:
        token_file = self.bootstrap if who == "bootstrap" else self.token_files[who]
        return [
            "--server", self.world.server.base_url, "--ca", str(self.world.server.ca_cert),
            "--token-file", str(token_file),
        ]  # fmt: skip

    def token(self, who: str) -> str:
        path = self.bootstrap if who == "bootstrap" else self.token_files[who]
        return path.read_text().strip()

    def call(self, who: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token(who)}"}
        data = None
        if isinstance(body, bytes):
            data = body
            headers["Content-Type"] = "application/octet-stream"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        resp = self.http.request(
            method, self.world.server.base_url + path, body=data, headers=headers
        )
        return resp.status, json.loads(resp.data) if resp.data else None


def add_operator(
    ops: Ops, capsys: pytest.CaptureFixture[str], name: str, role: str, who: str = "bootstrap"
) -> Path:
    code, out, err = run(capsys, ["operator", "add", name, "--role", role, *ops.opts(who)])
    assert code == 0, err
    assert f"operator {name} (role {role}) created" in out
    token = out.strip().splitlines()[-1]
    path = ops.world.tmp / f"{name}.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def ops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Ops]:
    w = start_world(tmp_path)
    try:
        w.release("1.0.0")
        o = Ops(w, {}, urllib3.PoolManager(ca_certs=str(w.server.ca_cert), retries=False))
        for role in ROLES:
            o.token_files[role] = add_operator(o, capsys, f"{role}-1", role)
        yield o
    finally:
        w.server.stop()


def audit_entries(ops: Ops) -> list[dict[str, Any]]:
    status, body = ops.call("bootstrap", "GET", "/api/v1/audit")
    assert status == 200
    assert isinstance(body, list)
    return body


def test_each_role_is_refused_above_its_level_and_allowed_at_it(ops: Ops) -> None:
    # What the cases act on, made by the bootstrap admin.
    with FleetClient(
        server_url=ops.world.server.base_url,
        ca_cert=ops.world.server.ca_cert,
        token=ops.token("bootstrap"),
    ) as fleet:
        for serial in ("d0", "d-revoke"):
            fleet.add_device(serial, HW)
    assert ops.call("bootstrap", "POST", "/api/v1/groups", {"name": "g0"})[0] == 201
    assert ops.call("bootstrap", "POST", "/api/v1/groups", {"name": "g-del"})[0] == 201
    status, _ = ops.call(
        "bootstrap", "POST", "/api/v1/operators", {"name": "victim", "role": "viewer"}
    )
    assert status == 201
    blob = b"a blob a release manager uploads"
    blob_name = f"{hashlib.sha256(blob).hexdigest()}.blob.bin"

    cases: list[tuple[str, str, str, str, Any, int]] = [
        # (needed role, audited action or "", method, path, body, success status)
        ("viewer", "", "GET", "/api/v1/devices", None, 200),
        ("viewer", "", "GET", "/api/v1/devices/d0", None, 200),
        ("viewer", "", "GET", "/api/v1/devices/d0/checkins", None, 200),
        ("viewer", "", "GET", "/api/v1/groups", None, 200),
        ("viewer", "", "GET", "/api/v1/groups/g0", None, 200),
        ("viewer", "", "GET", "/api/v1/audit", None, 200),
        ("viewer", "", "GET", "/api/v1/vulns", None, 200),
        ("viewer", "", "GET", "/api/v1/vulns/report", None, 200),
        ("operator", "device.add", "POST", "/api/v1/devices", {"serial": "new-1", "hardware_id": HW}, 201),
        ("operator", "device.quarantine", "POST", "/api/v1/devices/d0/quarantine", {"reason": "odd"}, 200),
        ("operator", "device.release", "POST", "/api/v1/devices/d0/release", None, 200),
        ("operator", "device.token", "POST", "/api/v1/devices/d0/token", None, 200),
        ("operator", "device.revoke", "POST", "/api/v1/devices/d-revoke/revoke", {"reason": "stolen"}, 200),
        ("operator", "device.tag", "POST", "/api/v1/devices/d0/tags", {"set": {"site": "berlin"}}, 200),
        ("operator", "group.create", "POST", "/api/v1/groups", {"name": "g1", "where": "site=berlin"}, 201),
        ("operator", "group.members", "POST", "/api/v1/groups/g0/members", {"add": ["d0"]}, 200),
        ("operator", "group.delete", "DELETE", "/api/v1/groups/g-del", None, 200),
        ("operator", "vuln.import", "POST", "/api/v1/vulns", {"id": "OSV-1", "affected": [
            {"package": {"purl": "pkg:generic/x"}, "versions": ["1"]}]}, 200),
        ("release-manager", "release.upload-blob", "PUT", f"/api/v1/blobs/{blob_name}", blob, 200),
        # Past the role check, verification judges the (empty) publication.
        ("release-manager", "release.publish", "POST", "/api/v1/publish", {"metadata": {}}, 422),
        ("admin", "", "GET", "/api/v1/operators", None, 200),
        ("admin", "operator.add", "POST", "/api/v1/operators", {"name": "new-op", "role": "viewer"}, 201),
        ("admin", "operator.revoke", "POST", "/api/v1/operators/victim/revoke", None, 200),
    ]  # fmt: skip
    expected_audit: list[tuple[str, str, str]] = []
    for needed, action, method, path, body, ok_status in cases:
        rank = ROLES.index(needed)
        for below in ROLES[:rank]:
            status, answer = ops.call(below, method, path, body)
            assert status == 403, (below, method, path, answer)
            assert answer == {
                "error": f"operator {below}-1 has role {below}; "
                f"{action or 'this request'} needs {needed} or above"
            }
            if action:
                expected_audit.append((f"{below}-1", action, "refused 403"))
        status, answer = ops.call(needed, method, path, body)
        assert status == ok_status, (needed, method, path, answer)
        if action:
            result = "ok" if status < 400 else f"refused {status}"
            expected_audit.append((f"{needed}-1", action, result))

    # Every audited attempt, refused or done, is in the log in order, with its result.
    entries = [e for e in audit_entries(ops) if e["actor"] != "bootstrap"]
    assert [(e["actor"], e["action"], e["result"].split(":")[0]) for e in entries] == (
        expected_audit
    )
    by_action = {e["action"]: e for e in entries if e["result"] == "ok"}
    assert by_action["device.quarantine"]["target"] == "d0"
    assert by_action["device.quarantine"]["detail"] == "odd"
    assert by_action["device.add"]["target"] == "new-1"
    assert by_action["device.tag"]["detail"] == "site=berlin"
    assert by_action["operator.add"]["target"] == "new-op"
    assert by_action["release.upload-blob"]["target"] == blob_name
    refused = [e for e in entries if e["action"] == "release.publish" and "422" in e["result"]]
    assert [e["result"] for e in refused] == [
        "refused 422: verification failed: nothing to publish"
    ]
    assert all(len(e["request_id"]) >= 8 for e in entries)
    # Reads are not audited.
    assert not [e for e in entries if e["action"] in ("", "device.list")]


def test_a_revoked_token_is_refused_on_its_next_request(
    ops: Ops, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, ["fleet", "list", *ops.opts("viewer")])
    assert code == 0
    code, out, _ = run(capsys, ["operator", "revoke", "viewer-1", *ops.opts("admin")])
    assert code == 0 and "revoked operator viewer-1 (role viewer)" in out

    status, answer = ops.call("viewer", "GET", "/api/v1/devices")
    assert status == 401
    assert answer == {"error": "the operator token 'viewer-1' was revoked"}
    code, _, err = run(capsys, ["fleet", "list", *ops.opts("viewer")])
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: list devices: the server refused the operator token: "
        "the operator token 'viewer-1' was revoked"
    )
    # Nor may it read the repository as an operator (it is no device either).
    resp = ops.http.request(
        "GET",
        ops.world.server.base_url + "/metadata/timestamp.json",
        headers={"Authorization": f"Bearer {ops.token('viewer')}"},
    )
    assert resp.status == 403
    # Revocation is final and listed.
    code, _, err = run(capsys, ["operator", "revoke", "viewer-1", *ops.opts("admin")])
    assert code == 2 and "already revoked" in err
    code, out, _ = run(capsys, ["operator", "list", *ops.opts("admin")])
    assert code == 0
    assert "viewer-1 viewer revoked" in out and "operator-1 operator active" in out
    # Only an admin lists tokens.
    code, _, err = run(capsys, ["operator", "list", *ops.opts("release-manager")])
    assert code == 77
    assert err.strip().splitlines()[-1] == (
        "access denied: list operators: operator release-manager-1 has role release-manager; "
        "this request needs admin or above"
    )


def test_bootstrap_token_file_and_local_operator_commands(
    ops: Ops, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(ops.world.server.data_dir)
    # On the data directory, no token needed: the first admin of a fresh server.
    code, out, err = run(capsys, ["server", "operator", "add", "root-admin", "--role", "admin",
                                  "--data", data])  # fmt: skip
    assert code == 0, err
    token = out.strip().splitlines()[-1]
    (ops.world.tmp / "root-admin.token").write_text(token)
    ops.token_files["root-admin"] = ops.world.tmp / "root-admin.token"
    # The running server takes it at once (same database).
    code, out, _ = run(capsys, ["operator", "list", *ops.opts("root-admin")])
    assert code == 0 and "root-admin admin active (created" in out and "by local" in out
    code, out, _ = run(capsys, ["server", "operator", "revoke", "root-admin", "--data", data])
    assert code == 0
    assert ops.call("root-admin", "GET", "/api/v1/operators")[0] == 401
    code, out, _ = run(capsys, ["server", "operator", "list", "--data", data])
    assert code == 0 and "root-admin admin revoked" in out
    entries = audit_entries(ops)
    local = [(e["actor"], e["action"], e["target"]) for e in entries if e["actor"] == "local"]
    assert local == [
        ("local", "operator.add", "root-admin"),
        ("local", "operator.revoke", "root-admin"),
    ]

    # Another database (a server on PostgreSQL): the commands use the one named.
    # A shared database is the operator's to migrate first (ADR 0009), and is refused before.
    other = f"sqlite+pysqlite:///{ops.world.tmp / 'other.db'}"
    add_elsewhere = ["server", "operator", "add", "elsewhere", "--role", "viewer",
                     "--data", data, "--database-url", other]  # fmt: skip
    code, out, err = run(capsys, add_elsewhere)
    assert code == 2 and "otaguard server db upgrade" in err
    code, out, err = run(capsys, ["server", "db", "upgrade", "--database-url", other])
    assert code == 0, err
    code, out, err = run(capsys, add_elsewhere)
    assert code == 0, err
    code, out, _ = run(
        capsys, ["server", "operator", "list", "--data", data, "--database-url", other]
    )
    assert code == 0 and "elsewhere viewer active" in out and "root-admin" not in out
    code, out, _ = run(capsys, ["server", "operator", "list", "--data", data])
    assert code == 0 and "elsewhere" not in out

    # Hostile or mistaken input: one line, exit 2, no traceback.
    for argv, why in (
        (["server", "operator", "add", "bootstrap", "--role", "admin", "--data", data], "reserved"),
        (["server", "operator", "add", "Bad!", "--role", "admin", "--data", data], "invalid operator name"),
        (["server", "operator", "add", "x", "--role", "admin", "--data", str(ops.world.tmp)], "not a server data directory"),
        (["server", "operator", "add", "viewer-1", "--role", "admin", "--data", data], "name taken"),
        (["server", "operator", "revoke", "nobody", "--data", data], "not found: no operator named 'nobody'"),
        (["operator", "add", "Bad!", "--role", "viewer", *ops.opts("admin")], "body.name: 'Bad!' is not of the form"),
    ):  # fmt: skip
        code, _, err = run(capsys, argv)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], (argv, err)
        assert "Traceback" not in err


def test_a_tampered_audit_log_fails_verification_naming_the_entry(
    ops: Ops, capsys: pytest.CaptureFixture[str]
) -> None:
    for serial in ("t1", "t2", "t3"):
        code, _, err = run(capsys, ["fleet", "add-device", "--serial", serial, "--hardware-id", HW,
                                    *ops.opts("operator")])  # fmt: skip
        assert code == 0, err
    code, out, err = run(capsys, ["audit", "--verify", *ops.opts("viewer")])
    assert code == 0, err
    lines = out.strip().splitlines()
    count = len(audit_entries(ops))
    assert lines[-1].startswith(f"audit chain verified: {count} entries, head ")
    assert any("operator-1(operator) device.add t2 ok" in line for line in lines)
    # --since lists the recent part, the chain is still verified from the start.
    code, out, _ = run(capsys, ["audit", "--since", "1h", "--verify", *ops.opts("viewer")])
    assert code == 0 and f"verified: {count} entries" in out
    code, out, _ = run(capsys, ["audit", "--since", "2000-01-01T00:00:00Z", *ops.opts("viewer")])
    assert code == 0 and "device.add t3 ok" in out

    db = sqlite3.connect(ops.world.server.data_dir / "otaguard.db")
    try:
        target_seq = next(e["seq"] for e in audit_entries(ops) if e["target"] == "t2")
        (original,) = db.execute(
            "SELECT target FROM audit_log WHERE seq = ?", (target_seq,)
        ).fetchone()
        with db:
            db.execute("UPDATE audit_log SET target = 't9' WHERE seq = ?", (target_seq,))
        code, _, err = run(capsys, ["audit", "--verify", *ops.opts("viewer")])
        assert code == 3
        assert err.strip().splitlines()[-1] == (
            f"verification failed: audit chain broken at entry {target_seq}: its content does "
            "not match its hash (the entry was altered)"
        )
        with db:
            db.execute("UPDATE audit_log SET target = ? WHERE seq = ?", (original, target_seq))
        code, _, err = run(capsys, ["audit", "--verify", *ops.opts("viewer")])
        assert code == 0, err
        # Deleting an entry in the middle is named by the entry after the gap.
        with db:
            db.execute("DELETE FROM audit_log WHERE seq = ?", (target_seq,))
        code, _, err = run(capsys, ["audit", "--verify", *ops.opts("viewer")])
        assert code == 3
        assert f"audit chain broken at entry {target_seq + 1}: expected entry {target_seq}" in err
    finally:
        db.close()
    # Without --verify the listing still works (it is the verification that fails).
    code, _, _ = run(capsys, ["audit", *ops.opts("viewer")])
    assert code == 0


def test_tokens_never_reach_logs_or_the_audit_log(
    ops: Ops, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    for argv in (
        ["-vv", "fleet", "add-device", "--serial", "leak-1", "--hardware-id", HW, *ops.opts("operator")],
        ["-vv", "fleet", "quarantine", "leak-1", "--reason", "x", *ops.opts("viewer")],
        ["-vv", "fleet", "tag", "leak-1", "site=berlin", *ops.opts("operator")],
        ["-vv", "group", "create", "leaky", *ops.opts("operator")],
        ["-vv", "operator", "revoke", "viewer-1", *ops.opts("admin")],
        ["-vv", "fleet", "list", *ops.opts("viewer")],
        ["-vv", "audit", "--verify", *ops.opts("viewer")],
    ):  # fmt: skip
        _, out, err = run(capsys, argv)
        seen += [out, err]
    # A made-up token is refused and not echoed either.
    wrong = "Wr0ng-t0ken-" + "x" * 31
    (ops.world.tmp / "wrong.token").write_text(wrong)
    ops.token_files["wrong"] = ops.world.tmp / "wrong.token"
    _, out, err = run(capsys, ["-vv", "fleet", "list", *ops.opts("wrong")])
    seen += [out, err]
    audit_dump = json.dumps(audit_entries(ops))
    data_dir = ops.world.server.data_dir
    db_bytes = b"".join(p.read_bytes() for p in data_dir.glob("otaguard.db*"))
    secrets = [ops.token(who) for who in (*ROLES, "bootstrap")] + [wrong]
    for secret in secrets:
        for text in (*seen, caplog.text, audit_dump):
            assert secret not in text
        assert secret.encode() not in db_bytes
    # Only the hashes are stored.
    assert hashlib.sha256(ops.token("admin").encode()).hexdigest().encode() in db_bytes
    assert "viewer-1" in audit_dump and "operator.revoke" in audit_dump


def test_every_operator_route_is_in_the_openapi_schema_with_its_role(ops: Ops) -> None:
    resp = ops.http.request("GET", ops.world.server.base_url + "/openapi.json")
    assert resp.status == 200
    schema = json.loads(resp.data)
    assert schema["components"]["securitySchemes"]["operatorToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["operatorToken"]["description"],
    }
    roles: dict[tuple[str, str], str] = {}
    for path, item in schema["paths"].items():
        if not path.startswith("/api/v1/") or path.startswith("/api/v1/device/"):
            continue
        for method, op in item.items():
            assert {"operatorToken": []} in op.get("security", []), (method, path)
            roles[(method, path)] = op["x-required-role"]
    assert roles[("post", "/api/v1/publish")] == "release-manager"
    assert roles[("put", "/api/v1/blobs/{filename}")] == "release-manager"
    assert roles[("post", "/api/v1/operators")] == "admin"
    assert roles[("get", "/api/v1/devices")] == "viewer"
    assert roles[("get", "/api/v1/devices/{serial}/checkins")] == "viewer"
    assert roles[("post", "/api/v1/devices/{serial}/quarantine")] == "operator"
    assert roles[("post", "/api/v1/groups/{name}/members")] == "operator"
    assert roles[("get", "/api/v1/audit")] == "viewer"
    assert roles[("get", "/api/v1/operator/whoami")] == "viewer"
    assert roles[("post", "/api/v1/vulns")] == "operator"
    assert roles[("get", "/api/v1/vulns")] == "viewer"
    assert roles[("get", "/api/v1/vulns/report")] == "viewer"
    assert roles[("get", "/api/v1/vulns/{vuln_id}/affected")] == "viewer"
    post_vulns = schema["paths"]["/api/v1/vulns"]["post"]
    assert post_vulns["x-audit-action"] == "vuln.import"
    assert "application/json" in post_vulns["requestBody"]["content"]
    assert len(roles) >= 20


def test_publish_needs_a_release_manager(ops: Ops, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["publish", str(ops.world.repo.dir), "--server", ops.world.server.base_url,
            "--ca", str(ops.world.server.ca_cert), "--token-file"]  # fmt: skip
    code, _, err = run(capsys, [*argv, str(ops.token_files["operator"])])
    assert code == 77
    assert err.strip().splitlines()[-1].startswith("access denied: ")
    assert "operator operator-1 has role operator; release." in err
    assert "needs release-manager or above" in err
    code, out, err = run(capsys, [*argv, str(ops.token_files["release-manager"])])
    assert code == 0, err
    assert out.startswith(f"published to {ops.world.server.base_url}")
    actions = [(e["actor"], e["action"], e["result"]) for e in audit_entries(ops)]
    assert ("release-manager-1", "release.publish", "ok") in actions
    assert any(a == "operator-1" and r.startswith("refused 403") for a, _, r in actions)


def test_the_request_id_ties_response_log_and_audit_entry(
    ops: Ops, caplog: pytest.LogCaptureFixture
) -> None:
    url = ops.world.server.base_url + "/api/v1/publish"
    headers = {"Authorization": f"Bearer {ops.token('release-manager')}",
               "Content-Type": "application/json"}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="otaguard"):
        resp = ops.http.request(
            "POST",
            url,
            body=b'{"metadata": {}}',
            headers={**headers, "X-Request-ID": "ci-job-0042"},
        )
    assert resp.status == 422
    assert resp.headers["X-Request-ID"] == "ci-job-0042"
    assert any("[request ci-job-0042]" in r.getMessage() for r in caplog.records)
    entry = audit_entries(ops)[-1]
    assert (entry["request_id"], entry["action"], entry["actor"]) == (
        "ci-job-0042", "release.publish", "release-manager-1"
    )  # fmt: skip
    # An id that is not short and plain is replaced, not stored or logged.
    resp = ops.http.request(
        "POST", url, body=b'{"metadata": {}}', headers={**headers, "X-Request-ID": "x\ty" * 40}
    )
    fresh = resp.headers["X-Request-ID"]
    assert len(fresh) == 32 and fresh.isalnum()
    assert audit_entries(ops)[-1]["request_id"] == fresh
