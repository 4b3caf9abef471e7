# The error cases are a table, one case per line.
# ruff: noqa: E501
"""Inventory: tags, static and dynamic groups, ``all``, ``fleet list/show``, ``members()``;
through the real CLI against a real HTTPS server, with real devices checking in."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

import pytest
import urllib3

from conftest import HW, World, error_lines
from otaguard.cli import main
from otaguard.server.inventory import Inventory
from otaguard.server.storage.fleet_base import UnknownNameError

_SERVER_LOG = re.compile(r"(DEBUG|INFO|WARNING|ERROR) (otaguard\.server|uvicorn)")


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process: exit code, stdout, stderr without the server's log."""
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
    err = "".join(
        line for line in captured.err.splitlines(keepends=True) if not _SERVER_LOG.match(line)
    )
    return code, captured.out, err


Cli = Callable[..., tuple[str, str]]


@pytest.fixture
def cli(world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """Run ``otaguard`` against the world's server with the bootstrap token."""
    monkeypatch.setenv("OTAGUARD_SERVER", world.server.base_url)
    monkeypatch.setenv("OTAGUARD_CA", str(world.server.ca_cert))
    monkeypatch.setenv("OTAGUARD_OPERATOR_TOKEN", world.server.operator_token)

    def call(*argv: str, code: int = 0) -> tuple[str, str]:
        got, out, err = run(capsys, list(argv))
        assert got == code, (argv, out, err)
        return out, err

    return call


def table_serials(out: str) -> list[str]:
    """The serials of a ``fleet list`` table (first column)."""
    return re.findall(r"^(inv-\d)\s", out, flags=re.MULTILINE)


def test_tags_groups_and_listing(world: World, cli: Cli) -> None:
    for n in range(1, 5):
        cli("fleet", "add-device", "--serial", f"inv-{n}", "--hardware-id", HW)
    out, _ = cli("fleet", "tag", "inv-1", "site=berlin", "line=2")
    assert out.strip() == "device inv-1 tags: line=2 site=berlin"
    cli("fleet", "tag", "inv-2", "site=berlin", "line=2")
    cli("fleet", "tag", "inv-3", "site=berlin", "line=3")
    cli("fleet", "tag", "inv-4", "site=munich")

    out, _ = cli("group", "create", "berlin2", "--where", "site=berlin,line=2")
    assert out.strip() == "created group berlin2 (dynamic, where line=2,site=berlin)"
    out, _ = cli("group", "create", "pilots")
    assert out.strip() == "created group pilots (static)"
    cli("group", "add", "pilots", "inv-1", "inv-3", "inv-4")
    out, _ = cli("group", "remove", "pilots", "inv-4")
    assert out.strip().splitlines() == ["group pilots (static): 2 device(s)", "inv-1 inv-3"]

    out, _ = cli("group", "show", "berlin2")
    assert out.strip().splitlines()[-1] == "inv-1 inv-2"
    out, _ = cli("group", "show", "all")
    assert out.strip().splitlines() == [
        "group all (builtin): 4 device(s)",
        "inv-1 inv-2 inv-3 inv-4",
    ]
    out, _ = cli("group", "list")
    assert out.strip().splitlines() == [
        "all (builtin)", "berlin2 (dynamic: line=2,site=berlin)", "pilots (static)"
    ]  # fmt: skip

    # fleet list: filters by group, by tags, and both.
    out, _ = cli("fleet", "list")
    assert table_serials(out) == ["inv-1", "inv-2", "inv-3", "inv-4"] and "4 device(s)" in out
    assert table_serials(cli("fleet", "list", "--group", "berlin2")[0]) == ["inv-1", "inv-2"]
    assert table_serials(cli("fleet", "list", "--group", "pilots")[0]) == ["inv-1", "inv-3"]
    assert table_serials(cli("fleet", "list", "--where", "site=berlin")[0]) == [
        "inv-1", "inv-2", "inv-3"
    ]  # fmt: skip
    out, _ = cli("fleet", "list", "--group", "pilots", "--where", "line=3")
    assert table_serials(out) == ["inv-3"]
    assert "site=berlin" in out and "all,pilots" in out

    # A dynamic group follows the tags at once.
    out, _ = cli("fleet", "untag", "inv-2", "line")
    assert out.strip() == "device inv-2 tags: site=berlin"
    cli("fleet", "tag", "inv-4", "site=berlin", "line=2")
    assert table_serials(cli("fleet", "list", "--group", "berlin2")[0]) == ["inv-1", "inv-4"]

    # members() is what the rollout code asks, and it agrees with the CLI.
    inv: Inventory = world.server.app.state.inventory
    assert inv.members("berlin2") == ["inv-1", "inv-4"]
    assert inv.members("pilots") == ["inv-1", "inv-3"]
    assert inv.members("all") == ["inv-1", "inv-2", "inv-3", "inv-4"]
    with pytest.raises(UnknownNameError, match="no group named 'nope'"):
        inv.members("nope")
    # entry() (one device's rows: what a check-in's policy reads) agrees with the listing
    listed = {e.device.serial: (e.tags, e.groups) for e in inv.entries()}
    assert listed["inv-4"] == ({"line": "2", "site": "berlin"}, ("all", "berlin2"))
    for serial, seen in listed.items():
        one = inv.entry(serial)
        assert one is not None and (one.tags, one.groups) == seen
    assert inv.entry("nobody") is None

    out, _ = cli("group", "delete", "pilots")
    assert out.strip() == "deleted group pilots"
    out, _ = cli("fleet", "show", "inv-1")
    assert "groups: all, berlin2" in out


def test_fleet_show_has_the_last_checkin_running_version_and_result(world: World, cli: Cli) -> None:
    out, _ = cli("fleet", "add-device", "--serial", "inv-9", "--hardware-id", HW)
    out, _ = cli("fleet", "show", "inv-9")
    assert "running version: unknown (never checked in)" in out
    assert "last check-in: never" in out

    dev = world.device("inv-8")  # registered and enrolled through the API
    cli("fleet", "tag", "inv-8", "site=berlin")
    dev.check()  # a real signed check-in over mutual TLS
    out, _ = cli("fleet", "show", "inv-8")
    lines = out.strip().splitlines()
    assert lines[0] == "device inv-8: enrolled"
    assert f"hardware id: {HW}" in lines
    assert "tags: site=berlin" in lines
    assert "groups: all" in lines
    assert "running version: 1.0.0" in lines
    assert any(line.startswith("last result: ") for line in lines)
    assert any(re.match(r"last check-in: \S+Z accepted, running 1\.0\.0", line) for line in lines)
    out, _ = cli("fleet", "list", "--where", "site=berlin")
    assert "inv-8" in out and "1.0.0" in out and "enrolled" in out


def test_inventory_mistakes_are_one_line_errors(world: World, cli: Cli) -> None:
    cli("fleet", "add-device", "--serial", "inv-1", "--hardware-id", HW)
    cli("group", "create", "dyn", "--where", "site=berlin")
    cli("group", "create", "stat")
    for argv, code, line in (
        (["fleet", "tag", "inv-1", "site"], 2, "error: invalid tag term 'site': expected key=value"),
        (["fleet", "tag", "inv-1", "site=a b"], 2, "error: invalid value 'a b' for tag site"),
        (["fleet", "tag", "nope", "site=x"], 2, "unknown device: tag nope: no device 'nope' in the registry"),
        (["fleet", "untag", "inv-1", "bad key"], 2, "error: invalid tag key 'bad key'"),
        (["group", "create", "g", "--where", "site"], 2, "body.where: 'site' is not of the form"),
        (["group", "create", "dyn"], 2, "name taken: create group dyn: a group named 'dyn' exists"),
        (["group", "create", "all"], 2, "group 'all' is built in"),
        (["group", "add", "dyn", "inv-1"], 2, "group 'dyn' is dynamic (site=berlin): change the devices' tags instead"),
        (["group", "add", "all", "inv-1"], 2, "group 'all' holds every device"),
        (["group", "add", "stat", "ghost"], 2, "no device 'ghost' in the registry"),
        (["group", "add", "missing", "inv-1"], 2, "not found: change group missing: no group named 'missing'"),
        (["group", "delete", "all"], 2, "cannot be deleted"),
        (["fleet", "list", "--group", "missing"], 2, "no group named 'missing'"),
        (["fleet", "list", "--where", "a=b=c"], 2, "query.where: 'a=b=c' is not of the form"),
        (["fleet", "show", "ghost"], 2, "unknown device: show ghost: no device 'ghost' in the registry"),
    ):  # fmt: skip
        _, err = cli(*argv, code=code)
        lines = error_lines(err)
        assert len(lines) == 1 and line in lines[0], (argv, err)
    # Nothing was half-done: the static group is still empty, the tags unchanged.
    out, _ = cli("group", "show", "stat")
    assert out.strip() == "group stat (static): 0 device(s)"
    out, _ = cli("fleet", "show", "inv-1")
    assert "tags: none" in out


def test_the_api_checks_tags_and_filters_itself(world: World, cli: Cli) -> None:
    """A client that skips the CLI's checks is refused by the server with the rule."""
    cli("fleet", "add-device", "--serial", "inv-1", "--hardware-id", HW)
    http = urllib3.PoolManager(ca_certs=str(world.server.ca_cert), retries=False)
    auth = {"Authorization": f"Bearer {world.server.operator_token}"}

    def post(path: str, body: object) -> tuple[int, object]:
        resp = http.request(
            "POST", world.server.base_url + path, body=json.dumps(body).encode(),
            headers={**auth, "Content-Type": "application/json"},
        )  # fmt: skip
        return resp.status, json.loads(resp.data)

    for tags, why in (
        # the schema's patterns refuse them before the route runs (422, field named)
        ({"bad key": "x"}, "body.set.bad key.[key]: 'bad key' is not of the form"),
        ({"site": "a,b"}, "body.set.site: 'a,b' is not of the form"),
        ({"site": "a=b"}, "body.set.site: 'a=b' is not of the form"),
        ({f"k{i}": "v" for i in range(33)}, "at most 32 items"),
    ):
        status, answer = post("/api/v1/devices/inv-1/tags", {"set": tags})
        assert status in (400, 422), (tags, answer)
        assert isinstance(answer, dict) and why in str(answer["error"]), (tags, answer)
    status, answer = post("/api/v1/groups", {"name": "g", "where": "site"})
    assert status == 422 and answer == {
        "error": "invalid request: body.where: 'site' is not of the form the API schema "
        "gives for it (see /openapi.json)"
    }
    resp = http.request(
        "GET", world.server.base_url + "/api/v1/devices?where=site%3Da%2Cb%3D", headers=auth
    )
    assert resp.status == 422 and b"query.where: 'site=a,b=' is not of the form" in resp.data
    out, _ = cli("fleet", "show", "inv-1")
    assert "tags: none" in out
    # The limit holds across requests: 20 tags, then 20 others would make 40.
    assert post("/api/v1/devices/inv-1/tags", {"set": {f"a{i}": "v" for i in range(20)}})[0] == 200
    status, answer = post("/api/v1/devices/inv-1/tags", {"set": {f"b{i}": "v" for i in range(20)}})
    assert status == 409  # a conflict with the device's state, not a malformed request
    assert answer == {"error": "conflict: device inv-1 would have 40 tags; the limit is 32"}
