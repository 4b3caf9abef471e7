"""The README's by-hand flow with a director, through the real CLI and a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from otaguard.cli import main
from otaguard.repo import ImageRepository
from otaguard.server import ServerSettings, start_server_in_thread
from otaguard.sim import make_image, wait_served
from sbom_support import sbom_beside


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_by_hand_flow_with_the_director(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", "by-hand passphrase")
    code, out, err = run(capsys, ["server", "init", "--data", "srv"])
    assert code == 0, err
    assert "director public key (for 'otaguard director init --online-key')" in out
    code, _, err = run(
        capsys,
        ["repo", "init", "repo", "--keys-dir", "keys", "--online-key", "srv/online-key.pub.json"],
    )
    assert code == 0, err
    code, out, err = run(
        capsys,
        ["director", "init", "director", "--keys-dir", "director-keys",
         "--online-key", "srv/director-key.pub.json"],
    )  # fmt: skip
    assert code == 0, err
    assert "director/metadata/root.json" in out
    make_image(tmp_path / "firmware.img", size=64 * 1024, seed="1.0.0")
    make_image(tmp_path / "firmware-new.img", size=64 * 1024, seed="1.1.0")
    for image, version in (("firmware.img", "1.0.0"), ("firmware-new.img", "1.1.0")):
        code, _, err = run(
            capsys,
            [
                "release",
                "add",
                "repo",
                image,
                "--version",
                version,
                "--hardware-id",
                "gw-v1",
                "--sbom",
                str(sbom_beside(tmp_path / image)),
                *(["--security"] if version == "1.1.0" else []),
            ],
        )
        assert code == 0, err

    server = start_server_in_thread(
        ServerSettings(
            data_dir=tmp_path / "srv",
            repo_dir=tmp_path / "repo",
            port=0,
            sync_interval=0.1,
            director_dir=tmp_path / "director",
        )
    )
    try:
        wait_served(server, ImageRepository(tmp_path / "repo"))
        monkeypatch.setenv("OTAGUARD_SERVER", server.base_url)
        monkeypatch.setenv("OTAGUARD_CA", "srv/ca/ca.pem")
        fleet_opts = ["--token-file", "srv/operator-token"]
        code, out, err = run(
            capsys,
            ["fleet", "add-device", "--serial", "dev1", "--hardware-id", "gw-v1", *fleet_opts],
        )
        assert code == 0, err
        monkeypatch.setenv("OTAGUARD_ENROLL_TOKEN", out.strip().splitlines()[-1].split()[0])
        code, _, err = run(
            capsys,
            ["device", "init", "dev1", "--serial", "dev1", "--server", server.base_url,
             "--root", "repo/metadata/root.json", "--director-root",
             "director/metadata/root.json", "--ca", "srv/ca/ca.pem", "--hardware-id", "gw-v1",
             "--factory-image", "firmware.img", "--factory-version", "1.0.0",
             "--unsafe-no-health-check"],
        )  # fmt: skip
        assert code == 0, err
        code, _, err = run(capsys, ["device", "enroll", "dev1"])
        assert code == 0, err

        code, out, err = run(capsys, ["fleet", "assign", "dev1", "--hold", *fleet_opts])
        assert code == 0, err
        assert "nothing (hold)" in out
        code, out, err = run(capsys, ["agent", "dev1", "update"])
        assert code == 0, err
        code, out, err = run(capsys, ["agent", "dev1", "status"])
        assert "1.0.0" in out and "1.1.0" not in out
        code, out, err = run(capsys, ["fleet", "assign", "dev1", "--default", *fleet_opts])
        assert code == 0 and "security releases and rollouts" in out
        code, out, err = run(capsys, ["agent", "dev1", "update"])
        assert code == 0, err
        assert "1.1.0" in out
        code, out, err = run(capsys, ["fleet", "show", "dev1", *fleet_opts])
        assert code == 0 and "last check-in:" in out
        assert "ALERT" not in out
    finally:
        server.stop()


def test_director_cli_refusals_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(
        capsys,
        ["director", "init", "d", "--keys-dir", "k", "--online-key", "missing.json",
         "--insecure-plaintext-keys"],
    )  # fmt: skip
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "garbage.json").write_text('{"signed": 1}')
    code, _, err = run(
        capsys, ["repo", "init", "repo", "--keys-dir", "keys", "--insecure-plaintext-keys"]
    )
    assert code == 0, err
    code, _, err = run(
        capsys,
        ["device", "init", "dev", "--serial", "dev", "--server", "https://127.0.0.1:1",
         "--root", "repo/metadata/root.json", "--director-root", "garbage.json",
         "--ca", "garbage.json",
         "--hardware-id", "hw", "--factory-image", "garbage.json", "--factory-version", "1.0.0",
         "--unsafe-no-health-check"],
    )  # fmt: skip
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "garbage.json is not valid TUF root" in err
    assert not (tmp_path / "dev").exists()
