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
from otaguard.server.storage.files import FileBlobStore
from otaguard.server.storage.sql import SQLMetadataStore, sqlite_url

__all__ = [
    "MAX_BLOB_BYTES",
    "BlobInfo",
    "BlobStore",
    "BlobWriter",
    "FileBlobStore",
    "MetadataRecord",
    "MetadataStore",
    "PublishOutcome",
    "SQLMetadataStore",
    "sqlite_url",
]
