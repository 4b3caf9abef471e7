"""``otaguard server db`` and ``server --database-url`` from the command line: one-line
errors, exit codes, the password never printed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from otaguard.cli import main
from otaguard.server.storage import head_revision, sqlite_url, upgrade_database

PASSWORD = "s3cret-db-password"


@pytest.fixture(autouse=True)
def _keep_log_handlers() -> Iterator[None]:
    """main() adds a stderr handler per call; drop it with the captured stream it names."""
    pkg = logging.getLogger("otaguard")
    handlers, level = list(pkg.handlers), pkg.level
    yield
    pkg.handlers[:] = handlers
    pkg.setLevel(level)


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    return subprocess.run(
        [sys.executable, "-m", "otaguard", *map(str, args)],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _with_password(url: str) -> str:
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def test_db_upgrade_and_status(postgres_url: str, tmp_path: Path) -> None:
    url = _with_password(postgres_url)  # trust authentication: never asked for
    status = _cli("server", "db", "status", env={"OTAGUARD_DATABASE_URL": url})
    assert status.returncode == 1, status.stderr
    assert f"schema revision none, this otaguard needs {head_revision()}" in status.stdout
    assert "otaguard server db upgrade" in status.stdout
    # A shared database behind: the server refuses to start, naming the command.
    server = _cli("server", "--data", tmp_path / "srv", "--port", "0", "--database-url", url)
    assert server.returncode == 2, server.stderr
    assert "Traceback" not in server.stderr
    last = server.stderr.strip().splitlines()[-1]  # after the file online key's warning
    assert last.startswith("configuration error: the database postgresql+psycopg://postgres:***@")
    assert "run 'otaguard server db upgrade --database-url URL'" in last
    upgraded = _cli("server", "db", "upgrade", "--database-url", url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from schema revision none to {head_revision()}" in upgraded.stdout
    again = _cli("server", "db", "upgrade", env={"OTAGUARD_DATABASE_URL": url})
    assert f"already at schema revision {head_revision()}" in again.stdout
    assert _cli("server", "db", "status", "--database-url", url).returncode == 0
    for result in (status, server, upgraded, again):
        assert PASSWORD not in result.stdout + result.stderr
        assert ":***@" in result.stdout + result.stderr


def test_db_upgrade_of_the_embedded_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "srv"
    data.mkdir()
    assert main(["server", "db", "upgrade", "--data", str(data)]) == 2
    assert "no server database in" in capsys.readouterr().err
    # A database an older otaguard left at the previous revision; --data before 'db'
    # counts as much as after it.
    upgrade_database(sqlite_url(data / "otaguard.db"), revision="0001")
    assert main(["server", "--data", str(data), "db", "status"]) == 1
    assert "schema revision 0001" in capsys.readouterr().out
    assert main(["server", "--data", str(data), "db", "upgrade"]) == 0
    assert f"from schema revision 0001 to {head_revision()}" in capsys.readouterr().out
    assert main(["server", "db", "status", "--data", str(data)]) == 0
    assert "(current)" in capsys.readouterr().out


def test_hostile_database_urls_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "mysql://root:" + PASSWORD + "@127.0.0.1/otaguard": "unsupported database 'mysql'",
        "not a url at all": "the database URL is malformed",
        "sqlite://": "a SQLite database URL must name a file",
        "postgresql://postgres:" + PASSWORD + "@127.0.0.1:5432/": "names no database",
        f"postgresql://nobody:{PASSWORD}@127.0.0.1:1/otaguard": "Connection refused",
    }
    for url, cause in cases.items():
        code = main(["server", "db", "upgrade", "--database-url", url])
        out, err = capsys.readouterr()
        assert code in (2, 5), (url, err)
        assert cause in err, (url, err)
        assert err.count("\n") == 1, err
        assert "Traceback" not in err
        assert PASSWORD not in out + err
    both = ["--data", str(tmp_path), "--database-url", "sqlite:////x.db"]
    assert main(["server", "db", "upgrade", *both]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["server", "db", "status"]) == 2
    assert "which database?" in capsys.readouterr().err
    missing = tmp_path / "missing.db"
    assert main(["server", "db", "status", "--database-url", f"sqlite:///{missing}"]) == 2
    assert "no database file" in capsys.readouterr().err
    assert not missing.exists()  # status never creates one
