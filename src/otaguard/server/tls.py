"""The server's TLS certificate: the fleet CA's (issued, and renewed while running) or the
operator's own (``--tls-cert/--tls-key``, watched for expiry).

A CA-issued certificate lives 30 days by default. Renewing it only at start-up would lock
the whole fleet out of a server left running for a month, so :class:`CertificateRenewer`
re-issues it once less than a third of its lifetime is left and loads it into the live
``SSLContext``: new connections get the new certificate, open ones keep theirs. An
operator-provided certificate cannot be renewed here; the server warns ahead of its
expiry and refuses to start with an expired one.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509

from otaguard.crypto.ca import CertificateAuthority
from otaguard.model.errors import ConfigError, OtaguardError
from otaguard.server._periodic import PeriodicTask
from otaguard.server.settings import ServerSettings

__all__ = [
    "WARN_BEFORE",
    "CertificateFiles",
    "CertificateRenewer",
    "ServerCertificate",
]

logger = logging.getLogger(__name__)

# An operator-provided certificate is reported this long before it expires, every check,
# so whoever reads the log has two weeks to replace it.
WARN_BEFORE: Final = dt.timedelta(days=14)
# How often the running server looks at its certificate: hourly, or ten times per
# lifetime when certificates are short-lived (tests), never more often than this.
MAX_CHECK_SECONDS: Final = 3600.0
MIN_CHECK_SECONDS: Final = 0.5
CHECKS_PER_LIFETIME: Final = 10
# A certificate file larger than this is not a certificate.
MAX_CERT_FILE_BYTES: Final = 256 * 1024


@dataclass(frozen=True)
class CertificateFiles:
    """The certificate chain and key the server presents.

    Attributes:
        cert: PEM certificate (chain).
        key: PEM private key.
        ca_cert: the fleet CA certificate clients trust, or ``None`` for an
            operator-provided certificate (clients get their trust anchor elsewhere).
    """

    cert: Path
    key: Path
    ca_cert: Path | None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        if path.stat().st_size > MAX_CERT_FILE_BYTES:
            raise ConfigError(f"TLS certificate {path} is too large")
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read TLS certificate {path}: {e.strerror}") from e
    except ValueError as e:
        raise ConfigError(f"{path} is not a PEM certificate") from e


class ServerCertificate:
    """Where the server's certificate comes from (see the module docstring)."""

    def __init__(self, settings: ServerSettings):
        self._settings = settings
        self._ca: CertificateAuthority | None = None

    @property
    def operator_provided(self) -> bool:
        """True when the operator gave ``--tls-cert/--tls-key``."""
        return self._settings.tls_cert is not None

    @property
    def lifetime(self) -> dt.timedelta:
        """Lifetime of CA-issued server certificates."""
        return self._settings.server_cert_lifetime

    def names(self) -> list[str]:
        """Host names and addresses a CA-issued certificate carries."""
        return [self._settings.host, *self._settings.tls_names]

    def current(self, *, now: dt.datetime | None = None) -> CertificateFiles:
        """The certificate to serve now, issuing a new CA certificate when one is due.

        Raises:
            ConfigError: the CA or an operator-provided file is unusable, or an
                operator-provided certificate has expired.
        """
        s = self._settings
        if s.tls_cert is not None and s.tls_key is not None:
            cert = _load_cert(s.tls_cert)
            if cert.not_valid_after_utc <= (now or dt.datetime.now(dt.UTC)):
                raise ConfigError(
                    f"TLS certificate {s.tls_cert} expired at "
                    f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; devices would refuse it"
                )
            return CertificateFiles(s.tls_cert, s.tls_key, None)
        if self._ca is None:
            self._ca = CertificateAuthority.load_or_create(s.data_dir / "ca")
        tls_dir = s.data_dir / "tls"
        try:
            tls_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create {tls_dir}: {e.strerror}") from e
        creds = self._ca.server_credentials(tls_dir, self.names(), lifetime=self.lifetime)
        return CertificateFiles(creds.cert_path, creds.key_path, self._ca.cert_path)

    def check_interval(self) -> float:
        """Seconds between checks of the certificate by the running server."""
        per_lifetime = self.lifetime.total_seconds() / CHECKS_PER_LIFETIME
        return min(MAX_CHECK_SECONDS, max(MIN_CHECK_SECONDS, per_lifetime))


class CertificateRenewer(PeriodicTask):
    """Keeps the live ``SSLContext`` serving a valid certificate (see the module docstring)."""

    def __init__(self, source: ServerCertificate, context: ssl.SSLContext):
        """Prepare (but do not start) watching ``source`` for ``context``."""
        super().__init__(interval=source.check_interval(), name="otaguard-tls-renewal")
        self._source = source
        self._context = context
        self._serving: tuple[Path, int, int] | None = None

    def _fingerprint(self, files: CertificateFiles) -> tuple[Path, int, int]:
        st = files.cert.stat()
        return files.cert, st.st_mtime_ns, st.st_size

    def check_once(self) -> bool:
        """Renew or reload if needed; warn ahead of the expiry of what cannot be renewed.

        Returns:
            True when a new certificate was loaded into the context.

        Raises:
            ConfigError: the certificate cannot be issued, read or loaded.
        """
        files = self._source.current()
        try:
            fingerprint = self._fingerprint(files)
        except OSError as e:
            raise ConfigError(f"cannot read TLS certificate {files.cert}: {e.strerror}") from e
        loaded = False
        if self._serving is not None and fingerprint != self._serving:
            try:
                self._context.load_cert_chain(str(files.cert), str(files.key))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"cannot load TLS certificate {files.cert}: {e}") from e
            loaded = True
        self._serving = fingerprint
        expires = _load_cert(files.cert).not_valid_after_utc
        if loaded:
            logger.info("server certificate renewed; valid until %s", f"{expires:%Y-%m-%d %H:%M}")
        if self._source.operator_provided and expires - dt.datetime.now(dt.UTC) < WARN_BEFORE:
            logger.warning(
                "TLS certificate %s expires at %s UTC: replace it before devices refuse the server",
                files.cert,
                f"{expires:%Y-%m-%d %H:%M}",
            )
        return loaded

    def _tick(self) -> None:
        try:
            self.check_once()
        except OtaguardError as e:
            logger.error("server certificate check failed: %s", e.diagnostics())  # noqa: TRY400 - one line
        except Exception:  # thread boundary: keep serving, record the bug
            logger.exception("unexpected error while checking the server certificate")
