"""Release side: publish a repository directory to an update server over HTTPS.

Used by ``otaguard publish REPO_DIR --server URL``. Blobs go first (each one the server
does not have yet), then all metadata in one request; the server verifies the set and
serves it atomically, so a failed publish leaves devices seeing the previous release.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import urllib3

from otaguard.crypto import warn_insecure
from otaguard.model.errors import (
    ConflictError,
    NotReadyError,
    OperatorError,
    TransportError,
    VerificationError,
)
from otaguard.server._repo_dir import BlobSource, read_current_set

__all__ = ["PublishResult", "publish_repository"]

logger = logging.getLogger(__name__)

# Connecting is quick on any sane network; a multi-GiB upload needs a generous read
# timeout because the server answers only after hashing and fsyncing the blob.
CONNECT_TIMEOUT_SECONDS: Final = 10.0
READ_TIMEOUT_SECONDS: Final = 300.0
# Server answers are small JSON; a larger body is a misbehaving server.
MAX_RESPONSE_BYTES: Final = 64 * 1024
# A 409 means another publication committed between the server's checks and ours; the
# server re-verifies against the new state on retry, so a few quick retries resolve a
# race between two release jobs, and a persistent conflict is reported, not looped on.
PUBLISH_ATTEMPTS: Final = 4
# Backoff before retry n (1-based) is CONFLICT_BACKOFF_SECONDS * 2**(n-1): 0.25, 0.5, 1 s.
CONFLICT_BACKOFF_SECONDS: Final = 0.25


@dataclass(frozen=True)
class PublishResult:
    """What :func:`publish_repository` did.

    Attributes:
        uploaded: blobs sent to the server.
        already_present: blobs the server already had.
        added: metadata files the server newly serves.
        unchanged: metadata files it already served.
        timestamp: stored name of the timestamp now served (``None`` if unchanged).
    """

    uploaded: tuple[str, ...]
    already_present: tuple[str, ...]
    added: tuple[str, ...]
    unchanged: tuple[str, ...]
    timestamp: str | None


class _Client:
    def __init__(self, pool: urllib3.PoolManager, server_url: str, token: str):
        self._pool = pool
        self._base = server_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {token}"}

    def request(
        self, method: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        url = f"{self._base}{path}"
        try:
            resp = self._pool.request(
                method,
                url,
                body=body,
                headers={**self._auth, **(headers or {})},
                preload_content=False,
                redirect=False,
            )
            try:
                data = resp.read(MAX_RESPONSE_BYTES)
            finally:
                resp.release_conn()
        except urllib3.exceptions.HTTPError as e:
            raise TransportError(f"{method} {url} failed: {e}") from e
        return resp.status, dict(resp.headers), data

    @staticmethod
    def reason(data: bytes) -> str:
        try:
            body = json.loads(data)
        except ValueError:
            return "no reason given"
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return " ".join(body["error"].split())[:500]
        return "no reason given"

    def check(self, what: str, status: int, data: bytes, *, retry_after: bool = False) -> None:
        if status in (200, 201):
            return
        reason = self.reason(data)
        if status == 401:
            raise OperatorError(f"{what}: the server refused the operator token")
        if status == 409:
            raise ConflictError(f"{what}: {reason}")
        if status == 422:
            raise VerificationError(f"{what}: server refused: {reason}")
        if status == 503 and retry_after:
            raise NotReadyError(f"{what}: server not ready: {reason}")
        if 400 <= status < 500:
            raise OperatorError(f"{what}: server answered {status}: {reason}")
        raise TransportError(f"{what}: server answered {status}: {reason}")

    def has_blob(self, blob: BlobSource) -> bool:
        status, headers, _ = self.request("HEAD", f"/targets/{quote(blob.name)}")
        length = {k.lower(): v for k, v in headers.items()}.get("content-length")
        return status == 200 and length == str(blob.length)

    def upload(self, blob: BlobSource) -> None:
        try:
            size = blob.path.stat().st_size
            if size != blob.length:
                raise VerificationError(
                    f"{blob.path} has {size} bytes but the targets metadata says {blob.length}"
                )
            with blob.path.open("rb") as f:
                status, _, data = self.request(
                    "PUT",
                    f"/api/v1/blobs/{quote(blob.name)}",
                    body=f,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    },
                )
        except OSError as e:
            raise OperatorError(f"cannot read blob {blob.path}: {e.strerror}") from e
        self.check(f"upload of {blob.name}", status, data)


def _post_publication(client: _Client, body: bytes) -> bytes:
    """POST the publication, retrying a 409 (a concurrent publication won) with backoff.

    Raises:
        ConflictError: still conflicting after :data:`PUBLISH_ATTEMPTS` attempts.
    """
    attempt = 1
    while True:
        status, headers, data = client.request(
            "POST", "/api/v1/publish", body=body, headers={"Content-Type": "application/json"}
        )
        retry_after = any(k.lower() == "retry-after" for k in headers)
        try:
            client.check("publish", status, data, retry_after=retry_after)
        except ConflictError as e:
            if attempt >= PUBLISH_ATTEMPTS:
                raise ConflictError(f"{e} (gave up after {attempt} attempts)") from e
            delay = CONFLICT_BACKOFF_SECONDS * 2 ** (attempt - 1)
            logger.info("publish conflicted with another publication; retrying in %.2f s", delay)
            time.sleep(delay)
            attempt += 1
            continue
        return data


def publish_repository(
    repo_dir: Path, *, server_url: str, ca_cert: Path | None, token: str
) -> PublishResult:
    """Upload a repository's current release to an update server and publish it.

    Args:
        repo_dir: repository directory written by :mod:`otaguard.repo`.
        server_url: ``https://host:port`` of the server.
        ca_cert: the server CA certificate (``DATA/ca/ca.pem``) the TLS connection is
            verified against; ``None`` only for an ``http://`` development server (warns).
        token: the server's operator token.

    Returns:
        What was uploaded and published.

    Raises:
        OperatorError: the repository is unreadable or mid-write, the token is wrong, or
            the server refused the request as malformed.
        VerificationError: the server's verification refused the release (its reason is
            in the message); the server still serves the previous release.
        ConflictError: other publications kept winning the race; retry later.
        NotReadyError: the server is not ready yet (HTTP 503 with Retry-After).
        TransportError: the server is unreachable, TLS verification failed, or it
            answered with a server error.
    """
    if server_url.startswith("https://"):
        if ca_cert is None:
            raise OperatorError("an https server needs the CA certificate to verify it")
        pool = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(ca_cert),
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=READ_TIMEOUT_SECONDS),
            retries=False,
        )
    elif server_url.startswith("http://"):
        warn_insecure(f"publishing to {server_url} without TLS")
        pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=READ_TIMEOUT_SECONDS),
            retries=False,
        )
    else:
        raise OperatorError(f"server URL must start with https:// (got {server_url!r})")
    current = read_current_set(repo_dir)
    uploaded: list[str] = []
    present: list[str] = []
    with pool:
        client = _Client(pool, server_url, token)
        for blob in current.blobs:
            if client.has_blob(blob):
                present.append(blob.name)
                continue
            client.upload(blob)
            uploaded.append(blob.name)
            logger.info("uploaded %s", blob.name)
        body = json.dumps(
            {
                "metadata": {
                    name: base64.b64encode(data).decode("ascii")
                    for name, data in sorted(current.metadata.items())
                }
            }
        ).encode()
        data = _post_publication(client, body)
    try:
        answer = json.loads(data)
        added = tuple(str(n) for n in answer["added"])
        unchanged = tuple(str(n) for n in answer["unchanged"])
        timestamp = answer.get("timestamp")
    except (ValueError, KeyError, TypeError) as e:
        raise TransportError("the server's publish answer is malformed") from e
    logger.info("published %d new metadata files to %s", len(added), server_url)
    return PublishResult(
        uploaded=tuple(uploaded),
        already_present=tuple(present),
        added=added,
        unchanged=unchanged,
        timestamp=str(timestamp) if timestamp is not None else None,
    )
