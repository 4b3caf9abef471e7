"""Configuration of the update server, as one explicit object (no globals, no env reads)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_DEVICE_CERT_LIFETIME",
    "DEFAULT_ENROLLMENT_TOKEN_LIFETIME",
    "DEFAULT_HEADER_TIMEOUT_SECONDS",
    "DEFAULT_SERVER_CERT_LIFETIME",
    "DEFAULT_SNAPSHOT_EXPIRY",
    "DEFAULT_TIMESTAMP_EXPIRY",
    "DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECONDS",
    "MAX_CLIENT_TIMEOUT_SECONDS",
    "MIN_ONLINE_EXPIRY",
    "ServerSettings",
    "parse_trusted_proxies",
]

#: TUF's usual lifetimes for the online roles: a day for the timestamp, a week for the snapshot
DEFAULT_TIMESTAMP_EXPIRY: Final = dt.timedelta(days=1)
DEFAULT_SNAPSHOT_EXPIRY: Final = dt.timedelta(days=7)
# Metadata expiry has a resolution of one second and is re-signed at half-life, so a
# lifetime below this would leave devices no time to fetch what was signed.
MIN_ONLINE_EXPIRY: Final = dt.timedelta(seconds=2)
# Ten years is not freshness any more; longer is a typo.
MAX_ONLINE_EXPIRY: Final = dt.timedelta(days=3650)
#: server certificates issued by the fleet CA; renewed while running at two thirds of it
DEFAULT_SERVER_CERT_LIFETIME: Final = dt.timedelta(days=30)
# Below this the renewal would race the handshakes it serves (tests use a few seconds);
# above it browsers' and TLS libraries' lifetime caps (398 days) would refuse it.
MIN_SERVER_CERT_LIFETIME: Final = dt.timedelta(seconds=6)
MAX_SERVER_CERT_LIFETIME: Final = dt.timedelta(days=397)

#: device certificates live a day: a stolen one is useful briefly, and devices renew
#: when a third is left (8 h), so a device offline for less than that keeps its identity
DEFAULT_DEVICE_CERT_LIFETIME: Final = dt.timedelta(hours=24)
#: an enrollment token is handed to the installer the day the device is set up
DEFAULT_ENROLLMENT_TOKEN_LIFETIME: Final = dt.timedelta(hours=24)
# Below a minute a certificate expires before the device renews it; above 90 days a
# stolen device key stays useful for too long after revocation is forgotten.
MIN_DEVICE_CERT_LIFETIME: Final = dt.timedelta(minutes=1)
MAX_DEVICE_CERT_LIFETIME: Final = dt.timedelta(days=90)
# A token lying around for more than a month is a standing credential, not a one-off.
MAX_ENROLLMENT_TOKEN_LIFETIME: Final = dt.timedelta(days=30)
#: a request's line and headers must be complete this long after the handshake (or the
#: previous response): an honest device sends them in one write; a client that trickles
#: bytes (slowloris) or idles loses its connection instead of holding a slot
DEFAULT_HEADER_TIMEOUT_SECONDS: Final = 10.0
#: a TLS handshake is a few round trips; asyncio's default (60 s) let idle TCP
#: connections hold a socket and a 256 KiB TLS buffer each for a minute
DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECONDS: Final = 10.0
#: longer client timeouts would only hand slow clients the connections back
MAX_CLIENT_TIMEOUT_SECONDS: Final = 120.0


def parse_trusted_proxies(
    values: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse trusted proxy addresses or CIDR networks (``127.0.0.1``, ``10.0.0.0/24``).

    Raises:
        ValueError: a value is neither an address nor a network.
    """
    networks = []
    for value in values:
        try:
            net = ipaddress.ip_network(value.strip(), strict=True)
        except ValueError as e:
            raise ValueError(
                f"trusted proxy {value!r} is not an IP address or CIDR network: {e}"
            ) from e
        if net.prefixlen == 0:
            # Everyone could then forward any certificate: the header would be a credential.
            raise ValueError(f"trusted proxy {value!r} would trust every address")
        networks.append(net)
    return tuple(networks)


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs to start.

    Attributes:
        data_dir: server state: ``otaguard.db``, ``blobs/``, ``ca/``, ``tls/``,
            ``operator-token``, and the online key ``online-key.pem`` with its public
            half ``online-key.pub.json``, and the device CA ``device-ca/``.
        repo_dir: repository directory to serve and follow; ``None`` serves only what is
            published through the operator API. It must hold no private key.
        host: address to bind, also put in the TLS certificate.
        port: TCP port; 0 picks a free one (tests, demo).
        sync_interval: seconds between checks of ``repo_dir`` for a new publication.
        insecure_http: serve plain HTTP (development only; warns on every start).
        database_url: SQLAlchemy URL of a database shared by several server processes
            (``postgresql://user:password@host:5432/db``, psycopg 3) in place of the
            embedded SQLite ``data_dir/otaguard.db``. The embedded database is migrated
            at start; a shared one must be at this code's schema revision already
            (``otaguard server db upgrade``), or the server refuses to start. It may
            carry a password: it is left out of ``repr`` and masked in logs.
        timestamp_expiry: lifetime of the timestamps the server signs; it re-signs when
            less than half is left.
        snapshot_expiry: lifetime of the snapshots the server signs (not shorter than
            the timestamp's).
        tls_cert: the operator's own server certificate (PEM chain), with ``tls_key``;
            ``None``: the fleet CA issues one and renews it while the server runs.
        tls_key: the private key of ``tls_cert``.
        tls_names: extra host names and addresses in CA-issued certificates.
        server_cert_lifetime: lifetime of CA-issued server certificates.
        online_key_uri: signer URI of the online key (e.g. an HSM's; its public key in
            ``data_dir/online-key.pub.json``); ``None`` uses the file key the server
            creates in ``data_dir`` (warns: production keys belong in an HSM).
        device_cert_lifetime: lifetime of the device certificates the server issues.
        enrollment_token_lifetime: how long a new enrollment token can be used.
        insecure_no_client_auth: serve metadata and targets to clients without a device
            certificate (development only; warns on every start). A certificate that is
            presented is still checked.
        trusted_proxies: addresses or CIDR networks of reverse proxies (nginx) that
            terminate mutual TLS and forward the verified client certificate in a header;
            that header is taken only from these TCP peers and ignored (and logged) from
            any other. Empty: no proxy is trusted.
        manufacturer_ca: PEM file of the manufacturer CA(s) whose factory certificates
            may enroll devices in place of a token (EST with client-certificate
            authentication); ``None``: factory enrollment is off. Factory certificates
            never authenticate device requests.
        director_dir: the director directory (``otaguard director init``) whose root
            names the server's director key: each accepted check-in is then answered
            with the device's signed instruction (Uptane). ``None``: no director.
        director_key_uri: signer URI of the director key (its public key in
            ``data_dir/director-key.pub.json``); ``None`` uses the file key the server
            creates in ``data_dir`` (warns).
        rollout_interval: seconds between evaluations of the active rollouts (phase
            advance, automatic halt) besides those at check-ins (ADR 0011).
        static_tree: keep the published repository as a static tree in this directory
            for nginx or a CDN (ADR 0016); ``None``: none.
        header_timeout: seconds a client has, after the TLS handshake or the previous
            response, to send a request's line and headers (slowloris defence, ADR 0016).
        tls_handshake_timeout: seconds a client has to complete the TLS handshake.
        hsm_pin: the user PIN of the PKCS#11 token holding an ``hsm:`` online or director
            key (the CLI reads it from ``OTAGUARD_HSM_PIN``, never from argv); never logged.
        monitor_interval: seconds between the monitor's sweeps (silence, cohorts,
            rollout phases; ADR 0026).
        device_poll_interval: how often devices poll (seconds); the silence signal counts
            missed polls in it.
        silent_intervals: polls a device may miss after an install before an alert.
        alert_policy: ``SIGNAL=ACTION,...`` over the default policy
            (:mod:`otaguard.fleet.policy`).
        webhook_urls: URLs each new alert is POSTed to (HMAC-signed).
        webhook_secret: the HMAC key of the webhooks (the CLI reads it from a file);
            never logged.
        mqtt_host: the MQTT broker (Mosquitto, mutual TLS); ``None``: no MQTT.
        mqtt_port: its TLS port.
        mqtt_ca: CA file of the broker's certificate; ``None``: the server's own TLS CA
            (``data_dir/ca/ca.pem``).
    """

    data_dir: Path
    repo_dir: Path | None
    host: str = "127.0.0.1"
    port: int = 8443
    sync_interval: float = 1.0
    insecure_http: bool = False
    database_url: str | None = field(default=None, repr=False)
    timestamp_expiry: dt.timedelta = DEFAULT_TIMESTAMP_EXPIRY
    snapshot_expiry: dt.timedelta = DEFAULT_SNAPSHOT_EXPIRY
    online_key_uri: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_names: tuple[str, ...] = ()
    server_cert_lifetime: dt.timedelta = DEFAULT_SERVER_CERT_LIFETIME
    device_cert_lifetime: dt.timedelta = DEFAULT_DEVICE_CERT_LIFETIME
    enrollment_token_lifetime: dt.timedelta = DEFAULT_ENROLLMENT_TOKEN_LIFETIME
    insecure_no_client_auth: bool = False
    trusted_proxies: tuple[str, ...] = ()
    manufacturer_ca: Path | None = None
    director_dir: Path | None = None
    director_key_uri: str | None = None
    rollout_interval: float = 5.0
    hsm_pin: str | None = field(default=None, repr=False)
    static_tree: Path | None = None
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECONDS
    monitor_interval: float = 30.0
    device_poll_interval: float = 3600.0
    silent_intervals: int = 3
    alert_policy: str = ""
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: bytes | None = field(default=None, repr=False)
    mqtt_host: str | None = None
    mqtt_port: int = 8883
    mqtt_ca: Path | None = None

    def _check_client_timeouts(self) -> None:
        for name in ("header_timeout", "tls_handshake_timeout"):
            if not 0 < getattr(self, name) <= MAX_CLIENT_TIMEOUT_SECONDS:
                raise ValueError(
                    f"{name} must be positive and at most {MAX_CLIENT_TIMEOUT_SECONDS:g} s"
                )

    def _check_monitoring(self) -> None:
        if not (self.monitor_interval > 0 and self.device_poll_interval > 0):
            raise ValueError("monitor_interval and device_poll_interval must be positive")
        if self.silent_intervals < 1:
            raise ValueError("silent_intervals must be at least 1")
        if self.webhook_urls and not self.webhook_secret:
            raise ValueError("webhooks need a secret (--webhook-secret-file)")
        if any(not u.startswith(("https://", "http://")) for u in self.webhook_urls):
            raise ValueError("a webhook URL must start with https:// or http://")

    def __post_init__(self) -> None:
        parse_trusted_proxies(self.trusted_proxies)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if not self.sync_interval > 0:
            raise ValueError("sync_interval must be positive")
        if not self.rollout_interval > 0:
            raise ValueError("rollout_interval must be positive")
        self._check_monitoring()
        self._check_client_timeouts()
        if not self.host:
            raise ValueError("host must not be empty")
        for name in ("timestamp_expiry", "snapshot_expiry"):
            value = getattr(self, name)
            if not MIN_ONLINE_EXPIRY <= value <= MAX_ONLINE_EXPIRY:
                raise ValueError(
                    f"{name} must be between {MIN_ONLINE_EXPIRY.total_seconds():g} s "
                    f"and {MAX_ONLINE_EXPIRY.days} days"
                )
        if not MIN_DEVICE_CERT_LIFETIME <= self.device_cert_lifetime <= MAX_DEVICE_CERT_LIFETIME:
            raise ValueError(
                f"device_cert_lifetime must be between {MIN_DEVICE_CERT_LIFETIME} and "
                f"{MAX_DEVICE_CERT_LIFETIME.days} days"
            )
        if not dt.timedelta(0) < self.enrollment_token_lifetime <= MAX_ENROLLMENT_TOKEN_LIFETIME:
            raise ValueError(
                "enrollment_token_lifetime must be positive and at most "
                f"{MAX_ENROLLMENT_TOKEN_LIFETIME.days} days"
            )
        if self.snapshot_expiry < self.timestamp_expiry:
            raise ValueError("snapshot_expiry must not be shorter than timestamp_expiry")
        if (self.tls_cert is None) is not (self.tls_key is None):
            raise ValueError("give both a TLS certificate and its key, or neither")
        if self.tls_cert is not None and self.tls_names:
            raise ValueError("TLS names apply to certificates the fleet CA issues, not to yours")
        if not MIN_SERVER_CERT_LIFETIME <= self.server_cert_lifetime <= MAX_SERVER_CERT_LIFETIME:
            raise ValueError(
                f"server_cert_lifetime must be between "
                f"{MIN_SERVER_CERT_LIFETIME.total_seconds():g} s and "
                f"{MAX_SERVER_CERT_LIFETIME.days} days"
            )
