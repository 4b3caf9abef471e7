"""A hostile or broken server answering the inventory, group, operator and audit commands:
the real CLI (a subprocess) prints one line and exits 4 (3 for a broken audit chain)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

GOOD_DEVICE: dict[str, Any] = {
    "serial": "d1", "hardware_id": "hw", "status": "enrolled", "reason": "",
    "cert_serials": [], "created_at": "2026-11-22T08:00:00Z",
    "updated_at": "2026-11-22T08:00:00Z", "tags": {"site": "berlin"}, "groups": ["all"],
    "last_checkin": None, "last_outcome": None, "running_version": None, "last_result": None,
}  # fmt: skip


class Hostile(BaseHTTPRequestHandler):
    """Answers every GET and POST with the body the test put in ``answers``."""

    answers: dict[str, bytes] = {}  # noqa: RUF012 - set per test, read by the handler

    def _answer(self) -> None:
        body = self.answers.get(self.path.split("?")[0], b'{"error": "no"}')
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def cli(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    env = {**base, "OTAGUARD_SERVER": server, "OTAGUARD_OPERATOR_TOKEN": "t" * 43}
    return subprocess.run(
        [sys.executable, "-m", "otaguard", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def device(**changes: Any) -> dict[str, Any]:
    return {**GOOD_DEVICE, **changes}


def audit_entry(**changes: Any) -> dict[str, Any]:
    entry = {"seq": 1, "time": "2026-11-22T08:00:00Z", "actor": "a", "role": "admin",
             "action": "x", "target": "", "result": "ok", "request_id": "r" * 8,
             "detail": "", "prev": "0" * 64, "hash": "f" * 64}  # fmt: skip
    return {**entry, **changes}


@pytest.mark.parametrize(
    "case",
    [
        ("/api/v1/devices", b"not json", ["fleet", "list"], 4, "answer is not JSON"),
        ("/api/v1/devices", {"a": 1}, ["fleet", "list"], 4, "device list is malformed"),
        ("/api/v1/devices", [device(last_result={"x": 1})], ["fleet", "list"], 4,
         "inventory answer is malformed"),
        ("/api/v1/devices", [device(tags=["x"])], ["fleet", "list"], 4,
         "inventory answer is malformed"),
        ("/api/v1/devices", [device(groups="all")], ["fleet", "list"], 4,
         "inventory answer is malformed"),
        ("/api/v1/devices", [device(last_checkin=5)], ["fleet", "list"], 4,
         "inventory answer is malformed"),
        ("/api/v1/groups", [{"name": "g", "kind": "static", "where": 3}], ["group", "list"], 4,
         "group answer is malformed"),
        ("/api/v1/groups/g", {"name": "g", "kind": "static", "where": None, "members": "ab"},
         ["group", "show", "g"], 4, "group answer is malformed"),
        ("/api/v1/operators", [{"name": "a"}], ["operator", "list"], 4,
         "operator answer is malformed"),
        ("/api/v1/operators", [1, 2], ["operator", "add", "bob", "--role", "viewer"], 4,
         "new-operator answer is malformed"),
        ("/api/v1/audit", [audit_entry(seq="1")], ["audit"], 4, "audit answer is malformed"),
        ("/api/v1/audit", [audit_entry(time=None)], ["audit"], 4, "audit answer is malformed"),
        # A chain the server made up still has to verify on the client.
        ("/api/v1/audit", [audit_entry()], ["audit", "--verify"], 3,
         "audit chain broken at entry 1: its content does not match its hash"),
        # A server repeating one full page forever is caught, not looped on.
        ("/api/v1/audit", [audit_entry()] * 1000, ["audit"], 4, "audit pages do not advance"),
    ],
)  # fmt: skip
def test_hostile_answers_are_one_line_errors(
    server: str, case: tuple[str, Any, list[str], int, str]
) -> None:
    """``case``: path answered, the answer, argv, expected exit code, text of the line."""
    path, answer, argv, code, needle = case
    Hostile.answers = {path: answer if isinstance(answer, bytes) else json.dumps(answer).encode()}
    proc = cli(server, *argv)
    lines = [
        line for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith("warning: INSECURE development mode")
    ]  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == code, proc.stderr
    assert needle in lines[0], lines[0]
