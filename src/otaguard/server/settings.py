"""Configuration of the update server, as one explicit object (no globals, no env reads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerSettings"]


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs to start.

    Attributes:
        data_dir: server state: ``otaguard.db``, ``blobs/``, ``ca/``, ``tls/``,
            ``operator-token``.
        repo_dir: repository directory to serve and follow; ``None`` serves only what is
            published through the operator API.
        host: address to bind, also put in the TLS certificate.
        port: TCP port; 0 picks a free one (tests, demo).
        sync_interval: seconds between checks of ``repo_dir`` for a new publication.
        insecure_http: serve plain HTTP (development only; warns on every start).
        database_url: SQLAlchemy URL overriding the embedded SQLite ``data_dir/otaguard.db``
            (e.g. ``postgresql+psycopg://...``).
    """

    data_dir: Path
    repo_dir: Path | None
    host: str = "127.0.0.1"
    port: int = 8443
    sync_interval: float = 1.0
    insecure_http: bool = False
    database_url: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if not self.sync_interval > 0:
            raise ValueError("sync_interval must be positive")
        if not self.host:
            raise ValueError("host must not be empty")
