"""Operator tokens managed on the server's own data directory (bootstrap, break-glass).

``otaguard server operator add|list|revoke --data DIR`` uses this: whoever can read the
data directory is already the server's administrator (it holds the bootstrap token, the
CA key and the database), so these commands need no token. Each change is audited as
actor ``local``, like the API's changes are audited under the token's name.
"""

import datetime as dt
import uuid
from pathlib import Path

from otaguard.model.errors import OperatorError
from otaguard.server.auth import Role, check_operator_name, hash_operator_token, new_operator_token
from otaguard.server.storage.database import sqlite_url
from otaguard.server.storage.fleet_base import NewAuditEntry, OperatorRecord
from otaguard.server.storage.migrate import open_database
from otaguard.server.storage.operators import SQLAuditStore, SQLOperatorStore

__all__ = ["LOCAL_ACTOR", "LocalOperators"]

#: the audit log's actor for changes made on the data directory
LOCAL_ACTOR = "local"
_DATABASE_FILE = "otaguard.db"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LocalOperators:
    """Operator tokens in the database of a server data directory."""

    def __init__(self, data_dir: Path, *, database_url: str | None = None):
        """Open the data directory's database (or ``database_url``).

        Raises:
            OperatorError: ``data_dir`` is not a server data directory.
            ServerStorageError: the database cannot be opened.
            DatabaseBehindError: a shared database is not at this code's revision.
        """
        if not (Path(data_dir) / "operator-token").is_file():
            raise OperatorError(
                f"{data_dir} is not a server data directory (run 'otaguard server init' first)"
            )
        # As the server does: the embedded file is migrated here, a shared database is
        # the operator's to migrate (otaguard server db upgrade).
        self._engine = open_database(
            database_url or sqlite_url(Path(data_dir) / _DATABASE_FILE),
            upgrade=database_url is None,
        )
        self._operators = SQLOperatorStore(self._engine)
        self._audit = SQLAuditStore(self._engine)

    def close(self) -> None:
        """Release the database."""
        self._engine.dispose()

    def __enter__(self) -> "LocalOperators":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _record(self, action: str, target: str, result: str, detail: str = "") -> None:
        self._audit.append(
            NewAuditEntry(
                actor=LOCAL_ACTOR,
                role=Role.ADMIN.value,
                action=action,
                target=target,
                result=result,
                request_id=f"local-{uuid.uuid4().hex}",
                detail=detail,
            ),
            now=_now(),
        )

    def add(self, name: str, *, role: Role) -> tuple[OperatorRecord, str]:
        """Make a named token; returns its account and the token (shown once).

        Raises:
            OperatorError: invalid or reserved name. NameExistsError: the name is taken.
        """
        try:
            check_operator_name(name)
        except ValueError as e:
            raise OperatorError(str(e)) from e
        token = new_operator_token()
        rec = self._operators.add(
            name,
            role=role.value,
            token_hash=hash_operator_token(token),
            created_by=LOCAL_ACTOR,
            now=_now(),
        )
        self._record("operator.add", name, "ok", f"role {role.value}")
        return rec, token

    def list(self) -> list[OperatorRecord]:
        """Every named token's account."""
        return self._operators.list()

    def revoke(self, name: str) -> OperatorRecord:
        """Revoke a named token.

        Raises:
            UnknownNameError: no such operator. OperatorError: already revoked.
        """
        rec = self._operators.revoke(name, now=_now())
        self._record("operator.revoke", name, "ok")
        return rec
