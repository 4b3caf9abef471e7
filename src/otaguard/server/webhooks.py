"""Outgoing alert webhooks: an HMAC-signed JSON body, bounded retries, a timeout.

Each new alert is POSTed to every configured URL from a background thread (a check-in
never waits on a receiver). The body is the alert as JSON; the headers carry::

    X-Otaguard-Timestamp: <unix seconds>
    X-Otaguard-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

A receiver recomputes the HMAC with the shared secret (:func:`signature`), compares in
constant time and refuses timestamps older than a few minutes (replays). The secret is
read from a file, never from argv, and never logged. A delivery is tried
:data:`MAX_ATTEMPTS` times with doubling pauses; any 2xx ends it; what still fails is
logged and dropped (the alert itself is in the database: ``otaguard alerts list``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Final

import urllib3

from otaguard.server.storage.monitoring import AlertRecord

__all__ = [
    "DELIVERY_TIMEOUT",
    "MAX_ATTEMPTS",
    "MAX_QUEUED",
    "WebhookSender",
    "alert_body",
    "signature",
]

logger = logging.getLogger(__name__)

#: seconds for connecting and for the whole answer: a receiver that hangs must not hold
#: the sender (and every later alert) for long
DELIVERY_TIMEOUT: Final = 5.0
#: attempts per delivery (1 + 3 retries): rides out a receiver restart, not an outage
MAX_ATTEMPTS: Final = 4
#: seconds before the first retry; doubled each time (0.5, 1, 2)
FIRST_BACKOFF: Final = 0.5
#: alerts waiting for delivery; beyond this new ones are dropped with a log line (an
#: alert storm must not grow memory without bound)
MAX_QUEUED: Final = 1000


def alert_body(alert: AlertRecord) -> bytes:
    """The JSON body POSTed for ``alert``."""
    return json.dumps(
        {
            "id": alert.id,
            "time": alert.time.isoformat(),
            "signal": alert.signal,
            "subject": alert.subject,
            "serial": alert.serial,
            "rollout": alert.rollout,
            "observed": alert.observed,
            "threshold": alert.threshold,
            "detail": alert.detail,
            "action": alert.action,
            "outcome": alert.outcome,
        },
        sort_keys=True,
    ).encode()


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``timestamp.body`` with ``secret``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookSender:
    """Delivers alerts to URLs from one daemon thread (an :class:`AlertSink`)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        secret: bytes,
        ca_file: str | None = None,
        timeout: float = DELIVERY_TIMEOUT,
        attempts: int = MAX_ATTEMPTS,
    ):
        """POST to ``urls``, signed with ``secret``; HTTPS verified against the system
        store or ``ca_file``."""
        if not secret:
            raise ValueError("a webhook needs a non-empty secret")
        self.urls = tuple(urls)
        self._secret = secret
        self._attempts = attempts
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=False,
            ca_certs=ca_file,
        )
        self._queue: queue.Queue[AlertRecord | None] = queue.Queue(MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        """Start the delivery thread."""
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Deliver what is queued (bounded by the timeouts), then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def send(self, alert: AlertRecord) -> None:
        """Queue ``alert``; dropped with a log line when the queue is full."""
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            logger.error("webhook queue full: alert %d not sent (stored)", alert.id)  # noqa: TRY400

    def _run(self) -> None:
        while (alert := self._queue.get()) is not None:
            body = alert_body(alert)
            for url in self.urls:
                if self._deliver(url, body):
                    self.delivered += 1
                else:
                    self.failed += 1
                    logger.error(
                        "webhook %s: alert %d not delivered after %d attempts",
                        url,
                        alert.id,
                        self._attempts,
                    )

    def _deliver(self, url: str, body: bytes) -> bool:
        pause = FIRST_BACKOFF
        for attempt in range(1, self._attempts + 1):
            stamp = str(int(time.time()))
            try:
                resp = self._http.request(
                    "POST",
                    url,
                    body=body,
                    headers={
                        "Content-Type": "application/json",
                        "X-Otaguard-Timestamp": stamp,
                        "X-Otaguard-Signature": signature(self._secret, stamp, body),
                    },
                )
                if 200 <= resp.status < 300:
                    return True
                logger.warning("webhook %s answered %d (attempt %d)", url, resp.status, attempt)
            except urllib3.exceptions.HTTPError as e:
                logger.warning("webhook %s failed (attempt %d): %s", url, attempt, type(e).__name__)
            if attempt < self._attempts:
                time.sleep(pause)
                pause *= 2
        return False
