"""One pooled connection and one transaction for all the statements of one request.

A store method opens its own connection (``engine.connect()`` for a read,
``engine.begin()`` for a write). On PostgreSQL each costs round trips of its own besides
its statements: the pool's liveness ping, ``BEGIN`` and ``COMMIT``/``ROLLBACK``. A device
check-in runs about ten statements, so those round trips were most of its database time
(ADR 0012, "Measured"). Inside :func:`unit_of_work` the stores that use :func:`reading`
and :func:`writing` run on the unit's connection instead, in its one transaction: the
unit commits when its block ends normally and rolls everything back when it raises.

The bound connection is a :class:`~contextvars.ContextVar`, so it belongs to the thread
(or task) that opened the unit and never leaks to another request. Inside a unit a store
method that fails leaves the whole unit to roll back: the unit, not the method, is the
transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import Row, Table, select
from sqlalchemy.engine import Connection, Engine

__all__ = ["after_commit", "newest_of_device", "reading", "unit_of_work", "writing"]

# (engine, its connection, what to run once it committed) of the unit open in this
# context, if any
_bound: ContextVar[tuple[Engine, Connection, list[Callable[[], None]]] | None] = ContextVar(
    "otaguard_unit", default=None
)


def _current(engine: Engine) -> Connection | None:
    bound = _bound.get()
    return bound[1] if bound is not None and bound[0] is engine else None


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[Connection]:
    """Run the block's store calls on ``engine`` in one connection and one transaction.

    Commits when the block ends, rolls back when it raises. A unit inside a unit of the
    same engine joins the outer one.
    """
    conn = _current(engine)
    if conn is not None:
        yield conn
        return
    committed: list[Callable[[], None]] = []
    with engine.begin() as conn:
        token = _bound.set((engine, conn, committed))
        try:
            yield conn
        finally:
            _bound.reset(token)
    for callback in committed:  # only when the block ended normally: committed
        callback()


def after_commit(engine: Engine, callback: Callable[[], None]) -> None:
    """Run ``callback`` once what this context wrote on ``engine`` is committed: when the
    open unit of work commits (never, if it rolls back), or now when none is open.

    Announcements of a change (the serving caches' signals) must not be seen before the
    change itself, or a reader could cache the old state under the new signal.
    """
    bound = _bound.get()
    if bound is not None and bound[0] is engine:
        bound[2].append(callback)
    else:
        callback()


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """The unit's connection if one is open, else a transaction of its own (``begin``)."""
    conn = _current(engine)
    if conn is not None:
        yield conn
        return
    with engine.begin() as conn:
        yield conn


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """The unit's connection if one is open, else a connection of its own (``connect``)."""
    conn = _current(engine)
    if conn is not None:
        yield conn
        return
    with engine.connect() as conn:
        yield conn


def newest_of_device(engine: Engine, table: Table, serial: str, *, limit: int) -> list[Row[Any]]:
    """One device's newest ``limit`` rows of a history ``table`` (``serial``, ``time``,
    ``id`` columns), newest first, read through :func:`reading`.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the store translates it (it knows the operation).
    """
    with reading(engine) as conn:
        return list(
            conn.execute(
                select(table)
                .where(table.c.serial == serial)
                .order_by(table.c.time.desc(), table.c.id.desc())
                .limit(limit)
            ).all()
        )
