"""Shared fixtures: a signed repository, a real HTTPS server, provisioned devices.

The custody split as in production: the server's data directory is prepared first, its
online public key goes into the offline-made repository's root, the private keys live in
a keys directory outside the repository, and the server signs snapshot and timestamp.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from db_support import DEFAULT_ADMIN_URL, ENGINES, fresh_database
from otaguard.agent import Device
from otaguard.crypto import read_public_key
from otaguard.repo import ImageRepository, Release
from otaguard.repo.director import init_director
from otaguard.server import RunningServer, ServerSettings, init_data_dir, start_server_in_thread
from otaguard.server.client import FleetClient
from otaguard.server.storage import open_database, upgrade_database
from otaguard.sim import SIM_HEALTH_COMMAND, make_image
from sbom_support import sbom_beside

HW = "test-hw"
#: every World key's passphrase (per-key passphrases are tested on their own)
PASSPHRASE = b"test passphrase"
IMAGE_SIZE = 2 * 1024 * 1024


def same_passphrase(_key_name: str) -> bytes:
    """The World's secrets source: one passphrase for every key."""
    return PASSPHRASE


def serial_of(name: str) -> str:
    """The serial World gives a device named ``name`` (names may hold ':' and '/')."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--database-url``: the PostgreSQL server the two-engine tests use."""
    parser.addoption(
        "--database-url",
        default=DEFAULT_ADMIN_URL,
        help="PostgreSQL server (an admin URL; each test creates and drops its own "
        "database there) for the tests that run on both engines; 'none': SQLite only",
    )


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database, once on SQLite and once on PostgreSQL (dropped afterwards)."""
    with fresh_database(request.config, request.param, tmp_path) as url:
        yield url


@pytest.fixture
def db_engine(database_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to the newest revision, on both engines."""
    engine = open_database(database_url, upgrade=True)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty PostgreSQL database (for what only a shared database shows)."""
    with fresh_database(request.config, "postgresql", tmp_path) as url:
        yield url


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the caller's otaguard settings."""
    for key in list(os.environ):
        if key.startswith("OTAGUARD_"):
            monkeypatch.delenv(key)


@dataclass
class World:
    """A repository served by a real HTTPS server, and a way to make devices."""

    tmp: Path
    repo: ImageRepository
    server: RunningServer
    releases: dict[str, Release]
    images: dict[str, Path]
    #: the director's root.json when the server runs a director (devices get it)
    director_root: Path | None = None

    @property
    def keys_dir(self) -> Path:
        """The offline keys directory (outside the repository)."""
        return self.repo.keys_dir

    def image(self, version: str, size: int = IMAGE_SIZE) -> Path:
        """Make (once) a deterministic image for ``version``."""
        if version not in self.images:
            self.images[version] = make_image(
                self.tmp / f"fw-{version}.img", size=size, seed=version
            )
        return self.images[version]

    def release(
        self, version: str, *, security: bool = False, counter: int | None = None
    ) -> Release:
        """Publish ``version`` and wait until the server serves it."""
        rel = self.repo.add_release(
            self.image(version),
            sbom=sbom_beside(self.image(version)),
            version=version,
            hardware_ids=[HW],
            security=security,
            security_counter=counter,
        )
        self.releases[version] = rel
        self.wait_served()
        return rel

    def wait_served(self) -> None:
        """Block until the server serves the repository's timestamp."""
        from otaguard.sim import wait_served

        wait_served(self.server, self.repo)

    def device(
        self, name: str = "dev", *, version: str = "1.0.0", enroll: bool = True, **kw: object
    ) -> Device:
        """Provision a device running ``version`` (simulated health check by default).

        It is registered with the server and enrolled unless ``enroll`` is false (or it
        talks plain HTTP).
        """
        assert self.server.ca_cert is not None
        kw.setdefault("health_command", SIM_HEALTH_COMMAND)
        if self.director_root is not None:
            kw.setdefault("director_root", self.director_root)
        dev = Device.provision(
            self.tmp / name,
            server_url=self.server.base_url,
            root_json=self.repo.metadata_dir / "root.json",
            ca_pem=self.server.ca_cert,
            hardware_id=HW,
            serial=serial_of(name),
            factory_image=self.image(version),
            factory_version=version,
            **kw,  # type: ignore[arg-type]
        )
        if enroll and not kw.get("insecure_http"):
            self.enroll(dev)
        return dev

    def enroll(self, dev: Device) -> None:
        """Register ``dev`` with the server and enroll it (as the factory would)."""
        with FleetClient(
            server_url=self.server.base_url,
            ca_cert=self.server.ca_cert,
            token=self.server.operator_token,
        ) as fleet:
            token = fleet.add_device(dev.config.serial, dev.config.hardware_id).token
        dev.enroll(token, key_store=dev.key_store)

    def cli(self) -> list[str]:
        """argv prefix to run the real CLI in a subprocess."""
        return [sys.executable, "-m", "otaguard"]


def start_world(
    tmp_path: Path,
    *,
    clock: Callable[[], dt.datetime] | None = None,
    director: bool = False,
    **server_settings: Any,
) -> World:
    """Server data dir first, then the offline repository naming its online key, then serve.

    ``server_settings`` go to :class:`ServerSettings` (e.g. ``timestamp_expiry``). With
    ``director``, an offline-made director root names the server's director key, the
    server answers check-ins with instructions, and devices are provisioned with it. The
    caller stops ``world.server``.
    """
    paths = init_data_dir(tmp_path / "server")
    repo = ImageRepository.init(
        tmp_path / "repo",
        keys_dir=tmp_path / "keys",
        passphrases=same_passphrase,
        online_key=read_public_key(paths.online_public_key),
    )
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "sync_interval": 0.1}
    director_root = None
    if director:
        director_root = init_director(
            tmp_path / "director",
            keys_dir=tmp_path / "director-keys",
            passphrases=same_passphrase,
            online_key=read_public_key(paths.director_public_key),
        )
        settings["director_dir"] = tmp_path / "director"
    settings.update(server_settings)
    server = start_server_in_thread(
        ServerSettings(data_dir=paths.data_dir, repo_dir=repo.dir, **settings), clock=clock
    )
    return World(tmp_path, repo, server, {}, {}, director_root)


@pytest.fixture
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """Repository with 1.0.0 published, served over HTTPS by a real server.

    Its database is the embedded SQLite one; a test marked
    ``@pytest.mark.parametrize("world", ENGINES, indirect=True)`` runs on PostgreSQL too
    (a fresh database, migrated as an operator would, given as ``--database-url``).
    """
    engine = getattr(request, "param", "sqlite")
    with ExitStack() as stack:
        url = None
        if engine != "sqlite":
            url = stack.enter_context(fresh_database(request.config, engine, tmp_path))
            upgrade_database(url)
        w = start_world(tmp_path, database_url=url)
        stack.callback(w.server.stop)
        w.release("1.0.0")
        yield w


_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO|WARNING) ")


def error_lines(err: str) -> list[str]:
    """What a command printed on stderr besides log records (timestamped INFO/WARNING
    lines, e.g. of an in-process server) and development-mode warnings: its error."""
    return [
        ln for ln in err.strip().splitlines()
        if ln and not _LOG_RECORD.match(ln) and "INSECURE" not in ln
    ]  # fmt: skip
