"""Schema migrations on SQLite and PostgreSQL: they make exactly the models' schema, keep
rows across an upgrade, adopt pre-migration databases, and a server refuses a shared
database that is behind."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from otaguard.model.errors import ServerStorageError
from otaguard.server import ServerSettings, init_data_dir
from otaguard.server.app import create_app
from otaguard.server.storage import (
    DatabaseBehindError,
    create_db_engine,
    head_revision,
    open_database,
    upgrade_database,
)
from otaguard.server.storage.migrate import BASELINE_REVISION, current_revision, require_current
from otaguard.server.storage.schema import load_schema

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


def _diff(url: str) -> list[object]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), load_schema()))
    finally:
        engine.dispose()


def test_migrations_make_exactly_the_models_schema(database_url: str) -> None:
    assert current_revision(database_url) is None
    assert upgrade_database(database_url) == (None, head_revision())
    # Every table, column, type, index and foreign key the models declare, nothing else.
    assert _diff(database_url) == []
    require_current(database_url)
    # Upgrading again is a no-op.
    assert upgrade_database(database_url) == (head_revision(), head_revision())


def test_the_migrations_are_needed(database_url: str) -> None:
    # The comparison above is not vacuous: at the baseline what later revisions add is
    # missing -- 0002's indexes, 0003's, 0004's, 0005's, 0006's and 0007's tables.
    upgrade_database(database_url, revision=BASELINE_REVISION)
    diff = _diff(database_url)
    kinds = [d for d in diff if isinstance(d, tuple)]
    assert {d[1].name for d in kinds if d[0] == "add_index"} >= {  # type: ignore[attr-defined]
        "ix_enrollment_tokens_serial",
        "ix_checkin_nonces_serial",
    }
    assert {d[1].name for d in kinds if d[0] == "add_table"} == {  # type: ignore[attr-defined]
        "director_assignments",
        "operators",
        "audit_log",
        "device_tags",
        "device_groups",
        "group_members",
        "rollouts",
        "channel_settings",
        "release_first_seen",
        "sbom_releases",
        "sbom_components",
        "device_health",
        "telemetry_reports",
        "alerts",
        "vulnerabilities",
    }


def _insert_rows(url: str) -> None:
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO devices (serial, hardware_id, status, reason, created_at,"
                    " updated_at) VALUES ('d1', 'hw', 'enrolled', '', :t, :t)"
                ),
                {"t": NOW},
            )
            conn.execute(
                text(
                    "INSERT INTO enrollment_tokens (token_hash, serial, expires_at, used_at)"
                    " VALUES (:h, 'd1', :t, NULL)"
                ),
                {"h": "a" * 64, "t": NOW},
            )
            conn.execute(
                text(
                    "INSERT INTO checkin_nonces (nonce, serial, cert_serial, issued_at,"
                    " expires_at, used_at) VALUES ('n1', 'd1', 'c1', :t, :t, NULL)"
                ),
                {"t": NOW},
            )
            conn.execute(
                text(
                    "INSERT INTO metadata (filename, role, version, sha256, data, published_at)"
                    " VALUES ('1.root.json', 'root', 1, :s, :d, :t)"
                ),
                {"s": "b" * 64, "d": b"{}", "t": NOW},
            )
    finally:
        engine.dispose()


def _rows(url: str) -> tuple[list[tuple[object, ...]], ...]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return (
                [tuple(r) for r in conn.execute(text("SELECT serial, status FROM devices"))],
                [tuple(r) for r in conn.execute(text("SELECT token_hash FROM enrollment_tokens"))],
                [tuple(r) for r in conn.execute(text("SELECT filename, data FROM metadata"))],
                [tuple(r) for r in conn.execute(text("SELECT nonce, serial FROM checkin_nonces"))],
            )
    finally:
        engine.dispose()


def test_upgrade_from_the_previous_revision_keeps_rows(database_url: str) -> None:
    upgrade_database(database_url, revision=BASELINE_REVISION)
    _insert_rows(database_url)
    before = _rows(database_url)
    assert upgrade_database(database_url) == (BASELINE_REVISION, head_revision())
    assert _rows(database_url) == before
    assert before[0] == [("d1", "enrolled")]
    assert _diff(database_url) == []


def _drop_version_table(url: str) -> None:
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
    finally:
        engine.dispose()


def test_a_database_from_before_migrations_is_adopted(database_url: str) -> None:
    # What an older server's create_all left: the baseline tables, no alembic_version.
    upgrade_database(database_url, revision=BASELINE_REVISION)
    _insert_rows(database_url)
    _drop_version_table(database_url)
    before = _rows(database_url)
    assert upgrade_database(database_url) == (None, head_revision())
    assert _rows(database_url) == before
    assert _diff(database_url) == []


def test_a_partial_otaguard_schema_is_refused(database_url: str) -> None:
    upgrade_database(database_url, revision=BASELINE_REVISION)
    _drop_version_table(database_url)
    engine = create_db_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE device_alerts"))
    engine.dispose()
    with pytest.raises(ServerStorageError, match=r"missing: device_alerts.*refusing to guess"):
        upgrade_database(database_url)


def test_a_database_from_a_newer_otaguard_is_refused(database_url: str) -> None:
    upgrade_database(database_url)
    engine = create_db_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(DatabaseBehindError, match="9999, which this otaguard does not know"):
        upgrade_database(database_url)
    with pytest.raises(DatabaseBehindError, match="newer than this otaguard knows"):
        require_current(database_url)


def test_a_server_refuses_a_shared_database_behind_and_names_the_command(
    postgres_url: str, tmp_path: Path
) -> None:
    paths = init_data_dir(tmp_path / "srv")
    settings = ServerSettings(data_dir=paths.data_dir, repo_dir=None, database_url=postgres_url)
    with pytest.raises(DatabaseBehindError, match="otaguard server db upgrade --database-url"):
        create_app(settings)
    upgrade_database(postgres_url, revision=BASELINE_REVISION)
    with pytest.raises(
        DatabaseBehindError, match=f"revision 0001, this server needs {head_revision()}"
    ):
        create_app(settings)
    assert current_revision(postgres_url) == BASELINE_REVISION  # the server changed nothing
    upgrade_database(postgres_url)
    create_app(settings)  # current: it starts
    assert "postgres_url" not in repr(settings) and postgres_url not in repr(settings)


def test_the_embedded_database_is_migrated_at_start(tmp_path: Path) -> None:
    paths = init_data_dir(tmp_path / "srv")
    create_app(ServerSettings(data_dir=paths.data_dir, repo_dir=None))
    url = f"sqlite+pysqlite:///{(paths.data_dir / 'otaguard.db').resolve()}"
    assert current_revision(url) == head_revision()


def test_concurrent_upgrades_migrate_once(postgres_url: str) -> None:
    # Several server processes (or operators) upgrading one database at the same time.
    errors: list[BaseException] = []
    results: list[tuple[str | None, str | None]] = []
    barrier = threading.Barrier(4)

    def upgrade() -> None:
        barrier.wait()
        try:
            results.append(upgrade_database(postgres_url))
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(results, key=str) == sorted(
        [(None, head_revision())] + [(head_revision(), head_revision())] * 3, key=str
    )
    engine = open_database(postgres_url, upgrade=False)
    assert "devices" in inspect(engine).get_table_names()
    engine.dispose()


def test_an_installed_wheel_migrates(tmp_path: Path) -> None:
    # The migrations travel inside the package: build the wheel, unpack it apart from the
    # source tree, and migrate a database with that copy of otaguard alone.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "whl"),
         str(Path(__file__).parents[2])],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "whl").glob("otaguard-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert "otaguard/server/storage/migrations/env.py" in names
    assert "otaguard/server/storage/migrations/script.py.mako" in names
    assert any(n.startswith("otaguard/server/storage/migrations/versions/r0001_") for n in names)
    script = (
        "import sys, otaguard\n"
        "from otaguard.server.storage import upgrade_database, sqlite_url\n"
        "assert otaguard.__file__.startswith(sys.argv[1]), otaguard.__file__\n"
        "print(upgrade_database(sqlite_url(sys.argv[2]))[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    run = subprocess.run(
        [sys.executable, "-c", script, str(site), str(tmp_path / "w.db")],
        env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == head_revision()
