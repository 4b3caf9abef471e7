"""The audit log's SQL adapter: appends from two engines at once (two server processes)
keep one unbroken chain, on SQLite and on PostgreSQL (where an advisory lock queues them);
entries are read back exactly as hashed."""

from __future__ import annotations

import datetime as dt
import threading

from otaguard.server.audit_chain import verify_chain
from otaguard.server.storage.database import create_db_engine
from otaguard.server.storage.fleet_base import NewAuditEntry
from otaguard.server.storage.migrate import upgrade_database
from otaguard.server.storage.operators import SQLAuditStore


def test_concurrent_appends_from_two_engines_keep_one_chain(database_url: str) -> None:
    upgrade_database(database_url)
    # Two engines: two connection pools, as two server processes have.
    engines = [create_db_engine(database_url), create_db_engine(database_url)]
    stores = [SQLAuditStore(e) for e in engines]
    failures: list[BaseException] = []

    def append(worker: int) -> None:
        store = stores[worker % 2]
        for i in range(25):
            try:
                store.append(
                    NewAuditEntry("alice", "operator", "device.tag", f"d{worker}-{i}", "ok",
                                  f"req-{worker}-{i:04d}", "site=berlin"),
                    now=dt.datetime.now(dt.UTC),
                )  # fmt: skip
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                failures.append(e)

    threads = [threading.Thread(target=append, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert failures == []
        entries = stores[1].entries(limit=1000)
        assert [e.seq for e in entries] == list(range(1, 101))
        assert verify_chain(entries) == (100, entries[-1].hash)
        assert len({e.target for e in entries}) == 100
        # Paging and the time filter.
        assert [e.seq for e in stores[0].entries(after_seq=98, limit=10)] == [99, 100]
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        assert stores[0].entries(since=later, limit=10) == []
    finally:
        for s in stores:
            s.close()
