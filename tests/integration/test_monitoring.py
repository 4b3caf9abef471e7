"""Fleet monitoring against a real server over mutual TLS (ADR 0026): telemetry over
HTTPS, a real clone of a device's credentials quarantined and alerted, alerts listed and
acknowledged with roles and audit, /metrics parsed by prometheus_client, webhooks signed
and retried against a local receiver."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from conftest import HW, World, start_world
from db_support import ENGINES
from otaguard.agent import Device
from otaguard.cli import main
from otaguard.model.errors import TransportError
from otaguard.server.storage.monitoring import AlertRecord
from otaguard.server.webhooks import WebhookSender, signature

_SERVER_LOG = re.compile(r"(DEBUG|INFO|WARNING|ERROR) (otaguard\.server|uvicorn)")
SECRET = b"webhook-secret-of-the-test-0123456789"


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """The CLI in-process: exit code, stdout, stderr without the server's log lines."""
    pkg = logging.getLogger("otaguard")
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


def opts(world: World, token_file: Path) -> list[str]:
    return ["--server", world.server.base_url, "--ca", str(world.server.ca_cert),
            "--token-file", str(token_file)]  # fmt: skip


def add_operator(world: World, capsys: pytest.CaptureFixture[str], name: str, role: str) -> Path:
    bootstrap = world.server.data_dir / "operator-token"
    code, out, err = run(capsys, ["operator", "add", name, "--role", role,
                                  *opts(world, bootstrap)])  # fmt: skip
    assert code == 0, err
    path = world.tmp / f"{name}.token"
    path.write_text(out.strip().splitlines()[-1] + "\n")
    path.chmod(0o600)
    return path


def api(world: World, path: str, *, token: str | None = None, method: str = "GET") -> Any:
    http = urllib3.PoolManager(ca_certs=str(world.server.ca_cert), retries=False)
    headers = {"Authorization": f"Bearer {token or world.server.operator_token}"}
    resp = http.request(method, world.server.base_url + path, headers=headers)
    return resp.status, resp.data


def alerts(world: World, *, include_acked: bool = False) -> list[dict[str, Any]]:
    status, data = api(world, "/api/v1/alerts" + ("?all=true" if include_acked else ""))
    assert status == 200, data
    return list(json.loads(data))


def clone(world: World, dev: Device, name: str) -> Device:
    """A copy of the device's whole directory (key, certificate, state) powered on."""
    copy = Device(shutil.copytree(dev.paths.root, world.tmp / name))
    copy.boot()
    return copy


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_telemetry_over_https_is_stored_and_shown(world: World) -> None:
    dev = world.device("tel1")
    dev.checkin()
    sent = dev.send_telemetry()
    again = dev.send_telemetry()
    assert (sent.seq + 1, sent.boot_id) == (again.seq, again.boot_id)
    status, data = api(world, "/api/v1/devices/tel1/telemetry")
    assert status == 200, data
    latest = json.loads(data)[0]
    assert latest["transport"] == "https"
    assert latest["report"]["seq"] == again.seq
    assert latest["report"]["running_version"] == "1.0.0"
    assert latest["report"]["boot_count"] == sent.boot_count >= 1
    assert alerts(world) == []


def test_hostile_telemetry_is_refused_with_its_problem_named(world: World) -> None:
    from test_checkin import request  # the same raw mutual-TLS request helper

    dev = world.device("tel2")
    status, data = request(world, dev, "POST", "/api/v1/device/telemetry", b"[" * 3000)
    assert status == 422
    assert json.loads(data)["error"] == "verification failed: telemetry nests deeper than 2 levels"
    status, data = request(world, dev, "POST", "/api/v1/device/telemetry", b"{}" * 3000)
    assert status == 413
    # Another device's serial in the document: refused, named.
    doc = dev.telemetry().to_dict() | {"serial": "someone-else"}
    status, data = request(world, dev, "POST", "/api/v1/device/telemetry",
                           json.dumps(doc).encode())  # fmt: skip
    assert status == 422
    assert "names device 'someone-else', but comes from 'tel2'" in json.loads(data)["error"]
    status, data = api(world, "/api/v1/devices/tel2/telemetry")
    assert json.loads(data) == []  # nothing stored


@pytest.mark.parametrize("world", ENGINES, indirect=True)
def test_a_real_clone_of_credentials_is_quarantined_with_an_alert_naming_the_signal(
    world: World,
) -> None:
    original = world.device("victim")
    original.checkin()
    original.send_telemetry()
    # The attacker copies the device's files (key, certificate, state) and powers it on.
    twin = clone(world, original, "twin")
    assert twin.paths.device_cert.read_bytes() == original.paths.device_cert.read_bytes()
    twin.checkin()
    twin.send_telemetry()  # alone, the clone looks like the device after a reboot
    assert alerts(world) == []
    # The original reports again: two boot sessions interleave under one certificate.
    original.send_telemetry()
    (alert,) = alerts(world)
    assert (alert["signal"], alert["subject"], alert["serial"]) == (
        "cloned-credentials", "device:victim", "victim",
    )  # fmt: skip
    assert "without the count advancing" in alert["observed"]
    assert alert["threshold"].startswith("one boot session at a time")
    assert (alert["action"], alert["outcome"]) == ("quarantine", "quarantined victim")
    status, data = api(world, "/api/v1/devices/victim")
    assert status == 200
    assert json.loads(data)["status"] == "quarantined"
    assert json.loads(data)["reason"].startswith("cloned-credentials: boot ")
    # Both holders of the certificate are refused from now on.
    for holder in (original, twin):
        with pytest.raises(TransportError, match="quarantined"):
            holder.send_telemetry()


def test_alerts_list_and_ack_with_roles_and_audit(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    original = world.device("a1")
    original.checkin()
    original.send_telemetry()
    clone(world, original, "a1-twin").send_telemetry()
    original.send_telemetry()
    viewer = add_operator(world, capsys, "watcher", "viewer")
    operator = add_operator(world, capsys, "oncall", "operator")
    code, out, _ = run(capsys, ["alerts", "list", *opts(world, viewer)])
    assert code == 0
    alert_id = alerts(world)[0]["id"]
    assert alert_id == 1
    assert f"#{alert_id} " in out and "cloned-credentials device:a1 [open]" in out
    assert "threshold: one boot session at a time" in out
    # A viewer may look, not acknowledge.
    code, _, err = run(capsys, ["alerts", "ack", str(alert_id), *opts(world, viewer)])
    assert code == 77
    assert "operator watcher has role viewer; alert.ack needs operator or above" in err
    code, out, err = run(capsys, ["alerts", "ack", str(alert_id), *opts(world, operator)])
    assert code == 0, err
    assert "[acked by oncall]" in out
    assert alerts(world) == []
    (acked,) = alerts(world, include_acked=True)
    assert acked["acked_by"] == "oncall"
    code, _, err = run(capsys, ["alerts", "ack", "999999", *opts(world, operator)])
    assert code == 2 and "no alert 999999" in err
    status, data = api(world, "/api/v1/audit")
    assert status == 200
    entries = [e for e in json.loads(data) if e["action"] == "alert.ack"]
    assert sorted((e["actor"], e["target"], e["result"].split(":")[0]) for e in entries) == [
        ("oncall", "1", "ok"), ("oncall", "999999", "refused 404"),
        ("watcher", "1", "refused 403"),
    ]  # fmt: skip


def test_metrics_are_valid_prometheus_text_for_a_viewer_only(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = world.device("m1")
    dev.checkin()
    dev.send_telemetry()
    http = urllib3.PoolManager(ca_certs=str(world.server.ca_cert), retries=False)
    assert http.request("GET", world.server.base_url + "/metrics").status == 401
    viewer = add_operator(world, capsys, "prometheus", "viewer").read_text().strip()
    status, data = api(world, "/metrics", token=viewer)
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(data.decode())
        for s in family.samples
    }
    assert samples[("otaguard_checkins_total", (("outcome", "accepted"),))] >= 1
    assert samples[("otaguard_telemetry_reports_total", (("transport", "https"),))] >= 1
    assert samples[("otaguard_devices", (("status", "enrolled"),))] == 1
    assert samples[("otaguard_devices_running", (("hardware_id", HW), ("version", "1.0.0")))] == 1
    # a timestamp lives a day; its expiry is written to the whole second (+1 s of slack)
    assert 0 < samples[("otaguard_metadata_expiry_seconds", (("role", "timestamp"),))] <= 86401
    assert samples[("otaguard_metadata_expiry_seconds", (("role", "root"),))] > 86400
    for cert in ("server-tls", "device-ca-root", "fleet-ca"):
        assert samples[("otaguard_certificate_expiry_seconds", (("certificate", cert),))] > 0
    assert ("otaguard_verification_failures_total", (("kind", "checkin"),)) in samples


@dataclass
class Receiver:
    """A local webhook receiver: answers ``statuses`` in turn (then 200), records posts."""

    statuses: list[int]
    delay: float = 0.0
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(statuses=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
            time.sleep(rec.delay)
            self.send_response(rec.statuses.pop(0) if rec.statuses else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


def test_an_alert_reaches_a_webhook_signed_after_a_retry(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.statuses = [503]  # the receiver is restarting: the first attempt fails
    world = start_world(tmp_path, webhook_urls=(receiver.url,), webhook_secret=SECRET)
    try:
        world.release("1.0.0")
        original = world.device("w1")
        original.checkin()
        original.send_telemetry()
        clone(world, original, "w1-twin").send_telemetry()
        original.send_telemetry()
        deadline = time.monotonic() + 20
        while len(receiver.posts) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        world.server.stop()
    assert len(receiver.posts) == 2  # one refused with 503, one accepted
    for headers, body in receiver.posts:
        stamp = headers["x-otaguard-timestamp"]
        expected = "sha256=" + hmac.new(SECRET, stamp.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()  # fmt: skip
        assert hmac.compare_digest(headers["x-otaguard-signature"], expected)
        assert abs(int(stamp) - time.time()) < 60
    sent = json.loads(receiver.posts[1][1])
    assert (sent["signal"], sent["serial"], sent["action"]) == (
        "cloned-credentials", "w1", "quarantine",
    )  # fmt: skip
    assert "without the count advancing" in sent["observed"]
    # A body altered in transit no longer matches its signature.
    headers, body = receiver.posts[1]
    forged = body.replace(b"w1", b"w2")
    assert (
        signature(SECRET, headers["x-otaguard-timestamp"], forged)
        != headers["x-otaguard-signature"]
    )


def test_a_hanging_receiver_is_cut_off_by_the_timeout_and_bounded_retries(
    receiver: Receiver,
) -> None:
    import datetime as dt

    receiver.delay = 3.0  # longer than the sender's timeout
    sender = WebhookSender([receiver.url], secret=SECRET, timeout=0.5, attempts=2)
    sender.start()
    started = time.monotonic()
    sender.send(AlertRecord(1, dt.datetime.now(dt.UTC), "attack-flags", "device:x", "x", None,
                            "flags f", "none", "d", "record", "recorded"))  # fmt: skip
    sender.stop()
    elapsed = time.monotonic() - started
    assert (sender.delivered, sender.failed) == (0, 1)
    assert len(receiver.posts) == 2  # two attempts, no more
    # 2 x 0.5 s timeouts + one 0.5 s pause, not 2 x 3 s of waiting on the receiver
    assert elapsed < 2.9
