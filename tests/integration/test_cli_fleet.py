"""``otaguard fleet`` and ``otaguard device enroll`` round trip through a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import HW, World
from otaguard.cli import main


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fleet_cli_round_trip(
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = world.server.data_dir / "operator-token"
    opts = ["--server", world.server.base_url, "--ca", str(world.server.ca_cert)]
    opts += ["--token-file", str(token_file)]
    code, out, _ = run(
        capsys, ["fleet", "add-device", "--serial", "cli-1", "--hardware-id", HW, *opts]
    )
    assert code == 0
    last = out.strip().splitlines()[-1]
    token, word, expiry = last.split(" ")
    assert word == "expires" and expiry.endswith("Z") and len(token) >= 22

    # The environment carries server, CA and operator token.
    monkeypatch.setenv("OTAGUARD_SERVER", world.server.base_url)
    monkeypatch.setenv("OTAGUARD_CA", str(world.server.ca_cert))
    monkeypatch.setenv("OTAGUARD_OPERATOR_TOKEN", token_file.read_text().strip())
    world.device("cli-1", enroll=False)
    monkeypatch.setenv("OTAGUARD_ENROLL_TOKEN", token)
    code, out, err = run(capsys, ["device", "enroll", str(world.tmp / "cli-1")])
    assert code == 0, err
    assert "enrolled device cli-1" in out
    assert token not in out + err

    code, out, _ = run(capsys, ["fleet", "list"])
    assert code == 0
    assert "cli-1" in out and "enrolled" in out and "1 device(s)" in out
    code, out, _ = run(capsys, ["fleet", "show", "cli-1"])
    assert code == 0 and "device cli-1: enrolled" in out
    # --json: one document on stdout, the same data
    code, out, _ = run(capsys, ["fleet", "list", "--json"])
    assert code == 0
    listed = json.loads(out)
    mine = [d for d in listed if d["serial"] == "cli-1"] if isinstance(listed, list) else []
    assert len(mine) == 1 and mine[0]["status"] == "enrolled", out
    code, out, _ = run(capsys, ["fleet", "show", "cli-1", "--json"])
    assert code == 0
    shown = json.loads(out)
    assert shown["device"]["serial"] == "cli-1" and shown["device"]["status"] == "enrolled", out
    assert shown["checkins"] == [] and shown["registered"].endswith("Z"), out
    code, out, _ = run(capsys, ["fleet", "quarantine", "cli-1", "--reason", "odd traffic"])
    assert code == 0 and "quarantined (odd traffic)" in out
    code, out, _ = run(capsys, ["fleet", "release", "cli-1"])
    assert code == 0 and "device cli-1: enrolled" in out
    code, out, _ = run(capsys, ["fleet", "revoke", "cli-1", "--reason", "stolen"])
    assert code == 0 and "revoked (stolen)" in out

    # Errors: one line, exit code by fault.
    code, _, err = run(capsys, ["fleet", "show", "nope"])
    assert code == 2
    assert err.strip().splitlines() == [
        "unknown device: show nope: no device 'nope' in the registry"
    ]
    code, _, err = run(capsys, ["device", "enroll", str(world.tmp / "cli-1")])
    assert code == 77  # the token was used (and the device is revoked)
    assert "access denied: enrollment refused" in err
    monkeypatch.setenv("OTAGUARD_OPERATOR_TOKEN", "w" * 43)
    code, _, err = run(capsys, ["fleet", "list"])
    assert code == 2 and "refused the operator token" in err
    monkeypatch.delenv("OTAGUARD_SERVER")
    code, _, err = run(capsys, ["fleet", "list"])
    assert code == 2 and "no server" in err


def test_operator_token_is_not_accepted_on_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fleet", "list", "--token", "s3cr3t-s3cr3t-s3cr3t-s3cr3t"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--token is not accepted" in err and "s3cr3t" not in err


def test_device_init_requires_a_serial(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["device", "init", "d", "--server", "https://x", "--root", "r", "--ca", "c"])
    assert "--serial" in capsys.readouterr().err
