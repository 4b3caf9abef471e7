"""Storage of the update server: interfaces and their adapters."""

from otaguard.server.storage.base import (
    MAX_BLOB_BYTES,
    BlobInfo,
    BlobStore,
    BlobWriter,
    MetadataRecord,
    MetadataStore,
    PublishOutcome,
)
from otaguard.server.storage.database import create_db_engine, mask_url, sqlite_url
from otaguard.server.storage.files import FileBlobStore
from otaguard.server.storage.migrate import (
    DatabaseBehindError,
    head_revision,
    open_database,
    upgrade_database,
)
from otaguard.server.storage.sql import SQLMetadataStore

__all__ = [
    "MAX_BLOB_BYTES",
    "BlobInfo",
    "BlobStore",
    "BlobWriter",
    "DatabaseBehindError",
    "FileBlobStore",
    "MetadataRecord",
    "MetadataStore",
    "PublishOutcome",
    "SQLMetadataStore",
    "create_db_engine",
    "head_revision",
    "mask_url",
    "open_database",
    "sqlite_url",
    "upgrade_database",
]
