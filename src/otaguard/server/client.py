"""Release side: publish a repository directory to an update server over HTTPS.

Used by ``otaguard publish REPO_DIR --server URL``. Blobs go first (each one the server
does not have yet), then all metadata in one request; the server verifies the set and
serves it atomically, so a failed publish leaves devices seeing the previous release.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import quote

import urllib3

from otaguard.crypto import warn_insecure
from otaguard.model.errors import (
    AccessDeniedError,
    ConflictError,
    DeviceExistsError,
    NotReadyError,
    OperatorError,
    TransportError,
    UnknownDeviceError,
    VerificationError,
)
from otaguard.server._repo_dir import BlobSource, read_current_set

__all__ = [
    "CheckinInfo",
    "DeviceCheckins",
    "DeviceInfo",
    "FleetClient",
    "NewDevice",
    "OperatorApiClient",
    "PublishResult",
    "publish_repository",
]

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
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        limit: int = MAX_RESPONSE_BYTES,
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
                data = resp.read(limit)
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
            raise OperatorError(f"{what}: the server refused the operator token: {reason}")
        if status == 403:
            raise AccessDeniedError(f"{what}: {reason}")
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


def _pool(server_url: str, ca_cert: Path | None, *, what: str) -> urllib3.PoolManager:
    """A connection pool verifying the server against ``ca_cert`` (TLS), or plain HTTP."""
    timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=READ_TIMEOUT_SECONDS)
    if server_url.startswith("https://"):
        if ca_cert is None:
            raise OperatorError("an https server needs the CA certificate to verify it")
        return urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED", ca_certs=str(ca_cert), timeout=timeout, retries=False
        )
    if server_url.startswith("http://"):
        warn_insecure(f"{what} to {server_url} without TLS")
        return urllib3.PoolManager(timeout=timeout, retries=False)
    raise OperatorError(f"server URL must start with https:// (got {server_url!r})")


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
    pool = _pool(server_url, ca_cert, what="publishing")
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


@dataclass(frozen=True)
class DeviceInfo:
    """A device as the server's registry holds it (see ``GET /api/v1/devices``)."""

    serial: str
    hardware_id: str
    status: str
    reason: str
    cert_serials: tuple[str, ...]
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def parse(cls, obj: Any) -> DeviceInfo:
        """Read one device of a server answer.

        Raises:
            TransportError: the answer is malformed.
        """
        try:
            return cls(
                serial=str(obj["serial"]),
                hardware_id=str(obj["hardware_id"]),
                status=str(obj["status"]),
                reason=str(obj["reason"]),
                cert_serials=tuple(str(c) for c in obj["cert_serials"]),
                created_at=dt.datetime.fromisoformat(obj["created_at"]),
                updated_at=dt.datetime.fromisoformat(obj["updated_at"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's device answer is malformed") from e


@dataclass(frozen=True)
class NewDevice:
    """A registered device and its single-use enrollment token."""

    device: DeviceInfo
    token: str
    token_expires: dt.datetime

    def __repr__(self) -> str:
        # The token is a secret: keep it out of logs and tracebacks.
        return (
            f"NewDevice(device={self.device!r}, token=<hidden>, token_expires={self.token_expires})"
        )


@dataclass(frozen=True)
class CheckinInfo:
    """One recorded check-in (see ``GET /api/v1/devices/{serial}/checkins``)."""

    time: dt.datetime
    running_version: str
    target: str
    boot_sha256: str
    attested: bool
    outcome: str
    detail: str


@dataclass(frozen=True)
class DeviceCheckins:
    """A device's check-ins (newest first) and alerts (time, kind, detail; newest first)."""

    serial: str
    attestation_key: bool
    checkins: tuple[CheckinInfo, ...]
    alerts: tuple[tuple[dt.datetime, str, str], ...]

    @classmethod
    def parse(cls, obj: Any) -> DeviceCheckins:
        """Read the server's answer.

        Raises:
            TransportError: the answer is malformed.
        """
        try:
            return cls(
                serial=str(obj["serial"]),
                attestation_key=bool(obj["attestation_key"]),
                checkins=tuple(
                    CheckinInfo(
                        time=dt.datetime.fromisoformat(c["time"]),
                        running_version=str(c["running_version"]),
                        target=str(c["target"]),
                        boot_sha256=str(c["boot_sha256"]),
                        attested=bool(c["attested"]),
                        outcome=str(c["outcome"]),
                        detail=str(c["detail"]),
                    )
                    for c in obj["checkins"]
                ),
                alerts=tuple(
                    (dt.datetime.fromisoformat(a["time"]), str(a["kind"]), str(a["detail"]))
                    for a in obj["alerts"]
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's check-in answer is malformed") from e


# Device listings are JSON of a few hundred bytes per device; bounds memory use.
MAX_FLEET_RESPONSE_BYTES: Final = 16 * 1024 * 1024


class OperatorApiClient:
    """A connection to the operator API: TLS verified against the server CA, the bearer
    token, timeouts and error mapping shared with the publish client. The API clients
    (:class:`FleetClient`, ``OpsClient``, ``RolloutClient``) add the routes.
    """

    def __init__(self, *, server_url: str, ca_cert: Path | None, token: str):
        """Prepare a client; nothing is sent yet.

        Raises:
            OperatorError: the URL is not https:// (or http:// with a warning), or an
                https URL has no CA certificate.
        """
        self._pool = _pool(server_url, ca_cert, what="managing the fleet")
        self._client = _Client(self._pool, server_url, token)

    def close(self) -> None:
        """Close the connections."""
        self._pool.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class FleetClient(OperatorApiClient):
    """The operator's client of the device registry API (``/api/v1/devices``).

    Shares the publish client's HTTP code: the same TLS verification against the server
    CA, bearer token, timeouts and error mapping.
    """

    def _call(self, what: str, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/json"} if body is not None else None
        status, _, data = self._client.request(
            method,
            f"/api/v1/devices{path}",
            body=json.dumps(body).encode() if body is not None else None,
            headers=headers,
            limit=MAX_FLEET_RESPONSE_BYTES,
        )
        reason = self._client.reason(data)
        if status == 404:
            raise UnknownDeviceError(f"{what}: {reason}")
        if status == 409:
            raise DeviceExistsError(f"{what}: {reason}")
        if status == 403:
            raise AccessDeniedError(f"{what}: {reason}")
        if status == 422:
            raise OperatorError(f"{what}: server refused the request: {reason}")
        self._client.check(what, status, data)
        try:
            return json.loads(data)
        except ValueError as e:
            raise TransportError(f"{what}: the server's answer is not JSON") from e

    def _new_device(self, answer: Any) -> NewDevice:
        try:
            return NewDevice(
                device=DeviceInfo.parse(answer["device"]),
                token=str(answer["token"]),
                token_expires=dt.datetime.fromisoformat(answer["token_expires"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TransportError("the server's new-device answer is malformed") from e

    def add_device(self, serial: str, hardware_id: str) -> NewDevice:
        """Register a device; returns its single-use enrollment token.

        Raises:
            DeviceExistsError: the serial is already registered.
            OperatorError: invalid serial or hardware id, or a wrong operator token.
            TransportError: the server is unreachable or answered with a server error.
        """
        answer = self._call(
            f"add device {serial}", "POST", "", {"serial": serial, "hardware_id": hardware_id}
        )
        return self._new_device(answer)

    def list_devices(self) -> list[DeviceInfo]:
        """Every registered device, by serial."""
        answer = self._call("list devices", "GET", "")
        if not isinstance(answer, list):
            raise TransportError("the server's device list is malformed")
        return [DeviceInfo.parse(d) for d in answer]

    def show(self, serial: str) -> DeviceInfo:
        """One device. Raises :class:`UnknownDeviceError` if not registered."""
        return DeviceInfo.parse(self._call(f"show {serial}", "GET", f"/{quote(serial, safe='')}"))

    def checkins(self, serial: str) -> DeviceCheckins:
        """A device's latest check-ins and alerts. Raises :class:`UnknownDeviceError`."""
        path = f"/{quote(serial, safe='')}/checkins"
        return DeviceCheckins.parse(self._call(f"check-ins of {serial}", "GET", path))

    def quarantine(self, serial: str, reason: str) -> DeviceInfo:
        """Refuse the device from its next request until released."""
        path = f"/{quote(serial, safe='')}/quarantine"
        return DeviceInfo.parse(
            self._call(f"quarantine {serial}", "POST", path, {"reason": reason})
        )

    def release(self, serial: str) -> DeviceInfo:
        """End a device's quarantine."""
        path = f"/{quote(serial, safe='')}/release"
        return DeviceInfo.parse(self._call(f"release {serial}", "POST", path))

    def revoke(self, serial: str, reason: str) -> DeviceInfo:
        """Refuse the device for good."""
        path = f"/{quote(serial, safe='')}/revoke"
        return DeviceInfo.parse(self._call(f"revoke {serial}", "POST", path, {"reason": reason}))

    def new_token(self, serial: str) -> NewDevice:
        """A new single-use enrollment token for a registered device (re-enrollment)."""
        path = f"/{quote(serial, safe='')}/token"
        return self._new_device(self._call(f"new token for {serial}", "POST", path))

    def assignment(self, serial: str) -> tuple[str, str] | None:
        """``(mode, version or "")`` the director applies to ``serial``; ``None`` when the
        server runs no director.

        Raises:
            UnknownDeviceError: no such device.
        """
        path = f"/{quote(serial, safe='')}/assignment"
        try:
            answer = self._call(f"assignment of {serial}", "GET", path)
        except OperatorError:
            return None
        try:
            return str(answer["mode"]), str(answer["version"] or "")
        except (KeyError, TypeError) as e:
            raise TransportError("the server's assignment answer is malformed") from e

    def assign(self, serial: str, *, version: str | None, hold: bool = False) -> tuple[str, str]:
        """Tell the director what ``serial`` installs: ``version``, nothing (``hold``), or
        (neither) the default policy, the newest release for its hardware id.

        Returns:
            ``(mode, version or "")`` as the server recorded it.

        Raises:
            UnknownDeviceError: no such device, or the server runs no director.
            OperatorError: an invalid version.
        """
        path = f"/{quote(serial, safe='')}/assignment"
        if version is None and not hold:
            answer = self._call(f"clear the assignment of {serial}", "DELETE", path)
        else:
            answer = self._call(
                f"assign to {serial}", "PUT", path, {"version": version, "hold": hold}
            )
        try:
            return str(answer["mode"]), str(answer["version"] or "")
        except (KeyError, TypeError) as e:
            raise TransportError("the server's assignment answer is malformed") from e
