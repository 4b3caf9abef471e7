"""``otaguard publish`` takes the operator token from a file or the environment, never argv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import otaguard.server.client
from otaguard.cli import main
from otaguard.server.client import PublishResult

SECRET = "s3cr3t-token-s3cr3t-token-s3cr3t-token-s3cr"
BASE = ["publish", "repo", "--server", "https://127.0.0.1:1", "--ca", "ca.pem"]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Tokens publish_repository was called with (nothing goes over the network)."""
    tokens: list[str] = []

    def fake_publish(_repo_dir: Path, **kw: Any) -> PublishResult:
        tokens.append(kw["token"])
        return PublishResult((), (), (), (), None)

    monkeypatch.setattr(otaguard.server.client, "publish_repository", fake_publish)
    return tokens


@pytest.mark.parametrize(
    "argv",
    [["--token", SECRET], [f"--token={SECRET}"], ["--token"]],
    ids=["space", "equals", "bare"],
)
def test_token_on_the_command_line_is_rejected(
    capsys: pytest.CaptureFixture[str], sent: list[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([*BASE, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--token is not accepted" in err
    assert "--token-file" in err
    assert SECRET not in err  # the secret is not echoed into logs
    assert sent == []


def test_token_is_not_an_abbreviation_of_token_file(
    capsys: pytest.CaptureFixture[str], sent: list[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*BASE, "--token-f", "file"])
    assert "unrecognized arguments" in capsys.readouterr().err
    assert sent == []


def test_token_from_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent: list[str]
) -> None:
    token_file = tmp_path / "operator-token"
    token_file.write_text(SECRET + "\n")
    assert main([*BASE, "--token-file", str(token_file)]) == 0
    monkeypatch.setenv("OTAGUARD_OPERATOR_TOKEN", SECRET[::-1])
    assert main(BASE) == 0
    assert sent == [SECRET, SECRET[::-1]]


def test_no_token_is_an_operator_error(capsys: pytest.CaptureFixture[str], sent: list[str]) -> None:
    assert main(BASE) == 2
    assert "no operator token" in capsys.readouterr().err
    assert sent == []
