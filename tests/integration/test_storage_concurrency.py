"""Single-use and compare-and-swap guarantees under real concurrency, on both engines.

Every racer has its own engine (its own connection pool), as separate server processes
on one database have: nothing is shared but the database. PostgreSQL runs at READ
COMMITTED, SQLite in WAL mode; the guarantees must come from the statements themselves.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from otaguard.model.errors import (
    AccessDeniedError,
    ConflictError,
    OperatorError,
    VerificationError,
)
from otaguard.server.publish import conflict_if_moved
from otaguard.server.storage import (
    MetadataRecord,
    SQLMetadataStore,
    create_db_engine,
    sqlite_url,
    upgrade_database,
)
from otaguard.server.storage.base import DeviceState, NonceRecord
from otaguard.server.storage.checkins import SQLCheckinStore
from otaguard.server.storage.devices import SQLDeviceStore

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
RACERS = 6
T = TypeVar("T")


@contextmanager
def engines_on(url: str) -> Iterator[list[Engine]]:
    """One engine per racer: separate pools, as separate server processes have."""
    upgrade_database(url)
    made = [create_db_engine(url) for _ in range(RACERS)]
    try:
        yield made
    finally:
        for e in made:
            e.dispose()


@pytest.fixture
def engines(database_url: str) -> Iterator[list[Engine]]:
    """Racers' engines, on SQLite and on PostgreSQL."""
    with engines_on(database_url) as made:
        yield made


@pytest.fixture
def sqlite_engines(tmp_path: Path) -> Iterator[list[Engine]]:
    """Racers' engines on SQLite (where no row lock helps)."""
    with engines_on(sqlite_url(tmp_path / "race.db")) as made:
        yield made


@pytest.fixture
def postgres_engines(postgres_url: str) -> Iterator[list[Engine]]:
    """Racers' engines on PostgreSQL (where a foreign key does not block a writer)."""
    with engines_on(postgres_url) as made:
        yield made


def race(calls: list[Callable[[], T]]) -> tuple[list[T], list[BaseException]]:
    """Run ``calls`` at once (released together by a barrier); results and errors."""
    barrier = threading.Barrier(len(calls))
    results: list[T] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(call: Callable[[], T]) -> None:
        barrier.wait()
        try:
            value = call()
        except BaseException as e:  # noqa: BLE001 - collected and asserted by the caller
            with lock:
                errors.append(e)
        else:
            with lock:
                results.append(value)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return results, errors


@contextmanager
def before_statement(engine: Engine, prefix: str, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` once, just before ``engine`` executes a statement starting ``prefix``."""
    fired: list[bool] = []

    def hook(*args: Any) -> None:
        statement: str = args[2]
        if not fired and statement.lstrip().upper().startswith(prefix):
            fired.append(True)
            action()

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", hook)
    assert fired, f"no statement starting {prefix!r} ran"


def test_an_enrollment_token_raced_by_several_processes_is_used_once(
    engines: list[Engine],
) -> None:
    SQLDeviceStore(engines[0]).add(
        "d1", "hw", token_hash="t" * 64, token_expires=NOW + dt.timedelta(hours=1), now=NOW
    )
    stores = [SQLDeviceStore(e) for e in engines]
    results, errors = race([lambda s=s: s.redeem_token("d1", "t" * 64, now=NOW) for s in stores])
    assert len(results) == 1
    assert results[0].serial == "d1"
    assert len(errors) == RACERS - 1
    for e in errors:
        assert isinstance(e, AccessDeniedError), e
        assert "already used" in str(e)


def test_a_token_redeemed_between_a_check_and_the_write_is_refused(
    engines: list[Engine],
) -> None:
    # Deterministic interleaving of the race above: A checked the token (unused), B
    # redeems it, then A writes. Only the conditional UPDATE stops A.
    SQLDeviceStore(engines[0]).add(
        "d1", "hw", token_hash="t" * 64, token_expires=NOW + dt.timedelta(hours=1), now=NOW
    )
    a, b = SQLDeviceStore(engines[1]), SQLDeviceStore(engines[2])
    won: list[str] = []

    def b_redeems() -> None:
        won.append(b.redeem_token("d1", "t" * 64, now=NOW).serial)

    with (
        before_statement(engines[1], "UPDATE ENROLLMENT_TOKENS", b_redeems),
        pytest.raises(AccessDeniedError, match="already used"),
    ):
        a.redeem_token("d1", "t" * 64, now=NOW)
    assert won == ["d1"]


def test_a_nonce_raced_by_several_processes_is_spent_once(engines: list[Engine]) -> None:
    SQLDeviceStore(engines[0]).add("d1", "hw", token_hash="t" * 64, token_expires=NOW, now=NOW)
    SQLCheckinStore(engines[0]).issue_nonce(
        NonceRecord("n1", "d1", "c1", NOW, NOW + dt.timedelta(minutes=1), None)
    )
    stores = [SQLCheckinStore(e) for e in engines]
    results, errors = race([lambda s=s: s.spend_nonce("n1", now=NOW) for s in stores])
    assert errors == []
    assert sorted(results) == [False] * (RACERS - 1) + [True]


def _rec(filename: str, role: str, version: int) -> MetadataRecord:
    data = f"{{{filename}}}".encode()
    return MetadataRecord(filename, role, version, data, f"{version:064d}")


def test_publications_raced_by_several_processes_move_the_pointer_once(
    engines: list[Engine],
) -> None:
    first = SQLMetadataStore(engines[0])
    first.publish([_rec("1.timestamp.json", "timestamp", 1)], timestamp="1.timestamp.json",
                  now=NOW, expected_timestamp=None)  # fmt: skip
    stores = [SQLMetadataStore(e) for e in engines]

    def publish(i: int, store: SQLMetadataStore) -> str:
        name = f"{i + 2}.timestamp.json"
        store.publish([_rec(name, "timestamp", i + 2)], timestamp=name, now=NOW,
                      expected_timestamp="1.timestamp.json")  # fmt: skip
        return name

    results, errors = race([lambda i=i, s=s: publish(i, s) for i, s in enumerate(stores)])
    assert len(results) == 1
    assert all(isinstance(e, ConflictError) for e in errors), errors
    current = first.current_timestamp()
    assert current is not None and current.filename == results[0]
    # The losers' rows were rolled back with their pointer move: one publication, whole.
    assert [n for n in (f"{i + 2}.timestamp.json" for i in range(RACERS)) if first.get(n)] == [
        results[0]
    ]


def test_a_stale_pointer_never_overwrites_a_newer_one(sqlite_engines: list[Engine]) -> None:
    # Deterministic interleaving: process B read the pointer, then A published, then B
    # writes. On SQLite no row lock stops B; the conditional UPDATE must. (On PostgreSQL
    # B's SELECT ... FOR UPDATE makes A wait instead; the race test above covers it.)
    engines = sqlite_engines
    a, b = SQLMetadataStore(engines[0]), SQLMetadataStore(engines[1])
    a.publish([_rec("1.timestamp.json", "timestamp", 1), _rec("2.timestamp.json", "timestamp", 2),
               _rec("3.timestamp.json", "timestamp", 3)],
              timestamp="1.timestamp.json", now=NOW, expected_timestamp=None)  # fmt: skip

    def a_publishes() -> None:
        a.publish([], timestamp="3.timestamp.json", now=NOW, expected_timestamp="1.timestamp.json")

    with (
        before_statement(engines[1], "UPDATE CURRENT", a_publishes),
        pytest.raises(ConflictError, match="concurrent publish moved the timestamp"),
    ):
        b.publish([], timestamp="2.timestamp.json", now=NOW, expected_timestamp="1.timestamp.json")
    current = a.current_timestamp()
    assert current is not None and current.filename == "3.timestamp.json"


def test_a_revocation_racing_a_release_stays(engines: list[Engine]) -> None:
    # The operator releases a quarantined device in one process while another revokes it:
    # the revocation commits between the release's read and its write. Revocation is final.
    setup = SQLDeviceStore(engines[0])
    setup.add("d1", "hw", token_hash="t" * 64, token_expires=NOW, now=NOW)
    setup.set_status("d1", DeviceState.QUARANTINED, reason="tampered boot", now=NOW)
    releaser, revoker = SQLDeviceStore(engines[1]), SQLDeviceStore(engines[2])

    def revoke() -> None:
        revoker.set_status("d1", DeviceState.REVOKED, reason="stolen", now=NOW)

    with (
        before_statement(engines[1], "UPDATE DEVICES", revoke),
        pytest.raises(OperatorError, match="revoked; revocation is final"),
    ):
        releaser.set_status("d1", DeviceState.ENROLLED, reason="", now=NOW)
    record = setup.get("d1")
    assert record is not None
    assert (record.status, record.reason) == (DeviceState.REVOKED, "stolen")


def test_a_revocation_racing_a_certificate_issue_stays(postgres_engines: list[Engine]) -> None:
    # The certificate is recorded while a revocation commits: the device stays revoked
    # (the gate refuses the certificate on every request). PostgreSQL only: on SQLite
    # the certificate INSERT already holds the write lock, so nothing can interleave.
    engines = postgres_engines
    setup = SQLDeviceStore(engines[0])
    setup.add("d1", "hw", token_hash="t" * 64, token_expires=NOW, now=NOW)
    issuer, revoker = SQLDeviceStore(engines[1]), SQLDeviceStore(engines[2])

    def revoke() -> None:
        revoker.set_status("d1", DeviceState.REVOKED, reason="stolen", now=NOW)

    with before_statement(engines[1], "UPDATE DEVICES", revoke):
        issuer.record_certificate("d1", "abc", not_after=NOW + dt.timedelta(days=1), now=NOW)
    record = setup.get("d1")
    assert record is not None
    assert record.status is DeviceState.REVOKED
    assert record.cert_serials == ("abc",)


def test_a_refusal_after_a_rival_publication_is_a_conflict(engines: list[Engine]) -> None:
    # Two processes sign the same next version: the loser finds the winner's file with
    # other bytes. Against a moved pointer that is a lost race (retry), not a refusal.
    a, b = SQLMetadataStore(engines[0]), SQLMetadataStore(engines[1])
    a.publish([_rec("1.timestamp.json", "timestamp", 1), _rec("2.timestamp.json", "timestamp", 2)],
              timestamp="1.timestamp.json", now=NOW, expected_timestamp=None)  # fmt: skip
    with (
        pytest.raises(VerificationError, match="refused"),
        conflict_if_moved(b, "1.timestamp.json"),
    ):
        raise VerificationError("refused")  # nothing moved: a refusal stays a refusal
    with (  # noqa: PT012 - the rival's publication happens inside, before the refusal
        pytest.raises(ConflictError, match="changed the repository meanwhile"),
        conflict_if_moved(b, "1.timestamp.json"),
    ):
        a.publish([], timestamp="2.timestamp.json", now=NOW,
                  expected_timestamp="1.timestamp.json")  # fmt: skip
        raise VerificationError("2.timestamp.json is already published with different content")


def test_processes_issuing_nonces_while_forgetting_expired_ones_never_fail(
    engines: list[Engine],
) -> None:
    # Every issue forgets expired nonces; several processes doing it at once over an
    # overlapping backlog must not fail (PostgreSQL: no deadlock between the deletes).
    devices = SQLDeviceStore(engines[0])
    store = SQLCheckinStore(engines[0])
    for d in range(RACERS):
        devices.add(f"d{d}", "hw", token_hash=f"{d:064d}", token_expires=NOW, now=NOW)
    old = NOW - dt.timedelta(hours=1)
    for i in range(300):
        store.issue_nonce(NonceRecord(f"old{i}", f"d{i % RACERS}", f"c{i}", old, old, None))
    stores = [SQLCheckinStore(e) for e in engines]

    def issue(d: int, s: SQLCheckinStore) -> None:
        for k in range(5):
            s.issue_nonce(
                NonceRecord(
                    f"new{d}-{k}", f"d{d}", f"cert{d}", NOW, NOW + dt.timedelta(minutes=1), None
                )
            )

    _, errors = race([lambda d=d, s=s: issue(d, s) for d, s in enumerate(stores)])
    assert errors == []
    assert all(store.get_nonce(f"new{d}-4") is not None for d in range(RACERS))
    assert store.get_nonce("old0") is None  # the backlog is gone
