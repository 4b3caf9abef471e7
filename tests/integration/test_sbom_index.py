"""The server's SBOM index: the store on SQLite and PostgreSQL, then the whole path — a
release published, its components indexed by the server, found through the operator API
and ``otaguard sbom find`` with the devices running it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from conftest import World
from otaguard.cli import main
from otaguard.cli._cli import out as cli_out
from otaguard.model.errors import OperatorError
from otaguard.model.sbom import Component
from otaguard.server.sbom_client import SbomClient
from otaguard.server.storage.checkins import checkins_table
from otaguard.server.storage.devices import devices_table
from otaguard.server.storage.sboms import SQLSbomStore
from otaguard.sim.sbom import VULNERABLE_OPENSSL

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
IMG100, IMG110 = "1" * 64, "2" * 64


def _components(openssl: str) -> list[Component]:
    return [
        Component("openssl", openssl, f"pkg:generic/openssl@{openssl}", "library"),
        Component("zlib", "1.3.1", "pkg:generic/zlib@1.3.1", "library"),
    ]


def _checkin(engine: Engine, serial: str, image: str, version: str, minute: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(checkins_table).values(
                serial=serial, cert_serial="c", time=NOW + dt.timedelta(minutes=minute),
                device_time="", running_version=version, target="factory", boot_sha256=image,
                attested=False, outcome="ok", detail="", manifest=b"{}",
            )
        )  # fmt: skip


def test_store_finds_releases_and_the_devices_running_them(db_engine: Engine) -> None:
    store = SQLSbomStore(db_engine)
    assert store.add_release(
        target="fw-1.0.0.img", version="1.0.0", image_sha256=IMG100, sbom_sha256="a" * 64,
        components=_components("3.0.13"), now=NOW,
    )  # fmt: skip
    assert store.add_release(
        target="fw-1.1.0.img", version="1.1.0", image_sha256=IMG110, sbom_sha256="b" * 64,
        components=_components("3.0.15"), now=NOW,
    )  # fmt: skip
    # a second server process indexing the same release at once: one copy of the rows
    assert not store.add_release(
        target="fw-1.0.0.img", version="1.0.0", image_sha256=IMG100, sbom_sha256="a" * 64,
        components=_components("3.0.13"), now=NOW,
    )  # fmt: skip
    assert store.indexed() == {"fw-1.0.0.img", "fw-1.1.0.img"}

    by_name = store.releases_with_component("openssl", version="3.0.13")
    assert [(h.target, h.release, h.purl) for h in by_name] == [
        ("fw-1.0.0.img", "1.0.0", "pkg:generic/openssl@3.0.13")
    ]
    by_purl = store.releases_with_component("pkg:generic/zlib@1.3.1")
    assert sorted(h.target for h in by_purl) == ["fw-1.0.0.img", "fw-1.1.0.img"]
    assert store.releases_with_component("openssl", version="9.9.9") == []

    with db_engine.begin() as conn:
        for serial in ("d1", "d2", "d3"):
            conn.execute(
                insert(devices_table).values(
                    serial=serial, hardware_id="hw", status="enrolled", reason="",
                    created_at=NOW, updated_at=NOW,
                )
            )  # fmt: skip
    # "running" is the image digest each device booted (its boot measurement), not a name
    _checkin(db_engine, "d1", IMG100, "1.0.0", 1)
    _checkin(db_engine, "d2", IMG100, "1.0.0", 1)
    _checkin(db_engine, "d2", IMG110, "1.1.0", 2)  # updated since: not vulnerable
    _checkin(db_engine, "d3", IMG110, "1.1.0", 1)
    running = store.devices_running(["fw-1.0.0.img"])
    assert [(d.serial, d.running_version) for d in running] == [("d1", "1.0.0")]
    assert running[0].last_checkin == NOW + dt.timedelta(minutes=1)
    assert [d.serial for d in store.devices_running(["fw-1.1.0.img"])] == ["d2", "d3"]


def test_published_release_is_indexed_and_found_with_its_devices(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dev = world.device()  # the world serves 1.0.0
    dev.update()  # checks in: the server records fw-1.0.0.img running on it
    world.release("1.1.0", security=True)  # the sync indexes it as it imports it
    assert world.server.app.state.sboms.refresh() == 0, "indexed when published, not later"

    assert world.server.ca_cert is not None
    with SbomClient(
        server_url=world.server.base_url, ca_cert=world.server.ca_cert,
        token=world.server.operator_token,
    ) as client:  # fmt: skip
        found = client.find("openssl", version=VULNERABLE_OPENSSL)
        fixed = client.find("openssl")
    old = world.releases["1.0.0"].path
    assert [(r.target, r.release) for r in found.releases] == [(old, "1.0.0")]
    assert [(d.serial, d.target) for d in found.devices] == [(dev.config.serial, old)]
    assert [r.release for r in fixed.releases] == ["1.1.0", "1.0.0"], "newest first"

    token = tmp_path / "token"
    token.write_text(world.server.operator_token)
    monkeypatch.setenv("OTAGUARD_SERVER", world.server.base_url)
    monkeypatch.setenv("OTAGUARD_CA", str(world.server.ca_cert))
    monkeypatch.setattr(cli_out, "width", 200)  # the table's cells unwrapped
    code = main(["sbom", "find", f"openssl@{VULNERABLE_OPENSSL}", "--token-file", str(token)])
    out = capsys.readouterr().out
    assert code == 0 and old in out and dev.config.serial in out
    assert "1 release(s), 1 device(s)" in out
    assert main(["sbom", "find", "no-such-lib", "--token-file", str(token)]) == 0
    assert "no release contains no-such-lib" in capsys.readouterr().out

    # the route needs an operator token (viewer at least); a wrong one is refused
    with (
        SbomClient(
            server_url=world.server.base_url, ca_cert=world.server.ca_cert, token="x" * 43
        ) as anonymous,
        pytest.raises(OperatorError, match="operator token missing or wrong"),
    ):
        anonymous.find("openssl")


def test_index_skips_an_sbom_blob_that_is_not_the_bound_bytes(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The blob store is trusted no more than a mirror: a stored SBOM that is not the bytes
    the signed image target binds is never indexed (a fresh index, over the served state)."""
    from otaguard.server.sbom_index import SbomIndex
    from otaguard.server.storage import open_database, sqlite_url
    from otaguard.sim.attacks import CompromisedServer

    rel = world.release("1.1.0", security=True)
    assert rel.info.sbom is not None
    attacker = CompromisedServer(world.server.data_dir)
    try:
        attacker.tamper_blob(rel.info.sbom.path)
    finally:
        attacker.close()
    engine = open_database(sqlite_url(tmp_path / "fresh-index.db"), upgrade=True)
    try:
        state = world.server.app.state
        index = SbomIndex(
            store=SQLSbomStore(engine), metadata=state.store, blobs=state.blobs,
            clock=lambda: NOW,
        )  # fmt: skip
        with caplog.at_level("WARNING", logger="otaguard.server.sbom_index"):
            assert index.refresh() == 1  # 1.0.0 only
        assert f"stored SBOM of {rel.path} is not the bytes it binds" in caplog.text
        assert SQLSbomStore(engine).indexed() == {world.releases["1.0.0"].path}
    finally:
        engine.dispose()
