"""Running the server: uvicorn with TLS from the fleet CA, in the foreground or in a thread.

:func:`init_data_dir` prepares a data directory without serving (``otaguard server
init``): the online key whose public half the offline tool puts in root, the operator
token and the CA devices trust.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import functools
import gc
import ipaddress
import logging
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import uvicorn
from fastapi import FastAPI

from otaguard.crypto import CertificateAuthority, warn_insecure
from otaguard.crypto.device_ca import DEVICE_CA_DIR, DeviceCA
from otaguard.model.errors import AddressInUseError, ConfigError
from otaguard.server._tls import ForwardedClientCert, TlsScopeProtocol
from otaguard.server._tls_groups import restrict_groups
from otaguard.server.access_log import AccessLog
from otaguard.server.app import create_app, prepare_data_dir
from otaguard.server.auth import OPERATOR_TOKEN_FILE, load_or_create_operator_token
from otaguard.server.checkin_fastpath import CheckinFastPath
from otaguard.server.director import DIRECTOR_PUBLIC_KEY_FILE, load_director_signer
from otaguard.server.fastpath import RepositoryFastPath
from otaguard.server.online import ONLINE_PUBLIC_KEY_FILE, load_online_signer
from otaguard.server.settings import ServerSettings, parse_trusted_proxies
from otaguard.server.storage.database import mask_url
from otaguard.server.tls import CertificateRenewer, ServerCertificate

__all__ = [
    "DataDirPaths",
    "RunningServer",
    "init_data_dir",
    "raise_descriptor_limit",
    "run_server",
    "start_server_in_thread",
]

logger = logging.getLogger(__name__)

# Start-up creates the CA and database on first run; a few seconds is plenty.
STARTUP_TIMEOUT_SECONDS: Final = 30.0
# Shutdown waits for in-flight requests, but not forever. Idle keep-alive TLS clients
# never answer the server's close_notify, so whatever is left after this is aborted.
SHUTDOWN_TIMEOUT_SECONDS: Final = 10.0
# The in-process server (tests, demo) stops quickly; its clients are local.
IN_THREAD_SHUTDOWN_TIMEOUT_SECONDS: Final = 1
# Idle keep-alive connections are closed after this, so slow clients cannot hold sockets.
KEEP_ALIVE_SECONDS: Final = 5
# Connections beyond this get 503 instead of exhausting file descriptors. Slow clients are
# cut after the header timeout, so this bounds what an attacker holds at once; it is well
# above the 1,100 partial connections of the slowloris test, so devices still get in, and
# well below the descriptors the process gets (raised to the hard limit at start).
MAX_CONCURRENT_CONNECTIONS: Final = 4096
# Descriptors besides client connections: database, blobs being served, logs, TLS files.
RESERVED_DESCRIPTORS: Final = 256


def raise_descriptor_limit() -> int:
    """Raise this process's open-file limit (soft) to its hard limit; return the new soft one.

    Each client connection is a descriptor: the default soft limit (often 1024) would let
    a thousand idle connections stop the server from opening anything else.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
            return soft
        return hard
    return soft


class _Server(uvicorn.Server):
    """uvicorn's server, aborting connections still open after the graceful shutdown,
    and with a TLS handshake deadline.

    Without the abort, an idle keep-alive TLS connection outlives the event loop (its TLS
    shutdown waits for the peer) and leaks a socket.
    """

    def __init__(self, config: uvicorn.Config, *, tls_handshake_timeout: float):
        super().__init__(config)
        self._handshake_timeout = tls_handshake_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start listening; every listener gets the TLS handshake deadline."""
        # uvicorn has no option for it and calls loop.create_server itself: for the length
        # of its start-up, this loop's create_server adds the deadline (asyncio's default,
        # 60 s, let a client that never completes a handshake hold a socket that long).
        loop = asyncio.get_running_loop()
        if self.config.ssl is not None:
            loop.create_server = functools.partial(  # type: ignore[method-assign]
                loop.create_server, ssl_handshake_timeout=self._handshake_timeout
            )
        try:
            await super().startup(sockets)
        finally:
            if self.config.ssl is not None:
                del loop.create_server  # the class's method again

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()


@dataclass(frozen=True)
class DataDirPaths:
    """What :func:`init_data_dir` prepared.

    Attributes:
        data_dir: the server's data directory (mode 0700).
        online_public_key: the online key's public half, for ``otaguard repo init
            --online-key`` on the offline signing machine.
        director_public_key: the director key's public half, for ``otaguard director
            init --online-key``.
        ca_cert: the CA certificate devices and publishers trust.
        operator_token: the operator API's bearer token file (mode 0600).
    """

    data_dir: Path
    online_public_key: Path
    ca_cert: Path
    operator_token: Path
    director_public_key: Path


def init_data_dir(
    data_dir: Path,
    *,
    online_key_uri: str | None = None,
    director_key_uri: str | None = None,
    hsm_pin: str | None = None,
) -> DataDirPaths:
    """Prepare a server data directory: online key, operator token, CAs. Idempotent.

    The device CA (``DATA/device-ca``: root and issuing CA) is created here too.

    Args:
        data_dir: the directory (created mode 0700).
        online_key_uri: as :attr:`ServerSettings.online_key_uri`; ``None`` creates the file
            key (warns: production keys belong in an HSM). An ``hsm:`` key's public half
            is written from the token into ``DATA/online-key.pub.json`` the first time.
        director_key_uri: the same for the director key.
        hsm_pin: the token's user PIN for ``hsm:`` keys.

    Raises:
        ConfigError: a key, token or CA file is unusable.
        ServerStorageError: the directory cannot be created.
    """
    data_dir = Path(data_dir)
    prepare_data_dir(data_dir)
    load_online_signer(data_dir, uri=online_key_uri, pin=hsm_pin)
    load_director_signer(data_dir, uri=director_key_uri, pin=hsm_pin)
    load_or_create_operator_token(data_dir)
    ca = CertificateAuthority.load_or_create(data_dir / "ca")
    DeviceCA.load_or_create(data_dir / DEVICE_CA_DIR)
    return DataDirPaths(
        data_dir=data_dir,
        online_public_key=data_dir / ONLINE_PUBLIC_KEY_FILE,
        ca_cert=ca.cert_path,
        operator_token=data_dir / OPERATOR_TOKEN_FILE,
        director_public_key=data_dir / DIRECTOR_PUBLIC_KEY_FILE,
    )


def _config(
    settings: ServerSettings,
    *,
    graceful_seconds: float = SHUTDOWN_TIMEOUT_SECONDS,
    clock: Callable[[], dt.datetime] | None = None,
) -> tuple[uvicorn.Config, Path | None, FastAPI, CertificateRenewer | None]:
    """Build the app, its uvicorn config (TLS unless insecure_http), the CA cert path,
    and the (not yet started) task that keeps the server certificate valid."""
    ca_cert: Path | None = None
    device_chain: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    source: ServerCertificate | None = None
    # Before the CA creates DATA/ca (and DATA with it, at the default mode): 0700 first.
    prepare_data_dir(settings.data_dir)
    if settings.insecure_no_client_auth or settings.insecure_http:
        warn_insecure("the update server serves metadata and targets without client certificates")
    if settings.insecure_http:
        warn_insecure("the update server is serving plain HTTP without TLS")
    else:
        source = ServerCertificate(settings)
        files = source.current()
        certfile, keyfile, ca_cert = str(files.cert), str(files.key), files.ca_cert
        device_chain = str(DeviceCA.load_or_create(settings.data_dir / DEVICE_CA_DIR).chain_path)
    app = create_app(settings) if clock is None else create_app(settings, clock=clock)
    descriptors = raise_descriptor_limit()
    max_connections = min(MAX_CONCURRENT_CONNECTIONS, max(1, descriptors - RESERVED_DESCRIPTORS))
    if max_connections < MAX_CONCURRENT_CONNECTIONS:
        logger.warning(
            "the open-file limit (%d) allows only %d concurrent connections",
            descriptors,
            max_connections,
        )
    trusted = parse_trusted_proxies(settings.trusted_proxies)
    if trusted:
        logger.info(
            "taking forwarded client certificates from trusted proxies %s",
            ", ".join(str(t) for t in trusted),
        )
    config = uvicorn.Config(
        # The certificate a trusted proxy verified and forwarded, into the ASGI scope.
        # The repository fast path (ADR 0016) and the check-in's lean path (ADR 0019)
        # before FastAPI's and Starlette's layers; the access log outside them, inside
        # the forwarded-certificate layer so it names the forwarded certificate's device.
        ForwardedClientCert(
            AccessLog(
                CheckinFastPath(
                    RepositoryFastPath(app, **app.state.fast_path_options),
                    **app.state.checkin_fast_path_options,
                )
            ),
            trusted_proxies=trusted,
        ),
        host=settings.host,
        port=settings.port,
        log_config=None,  # the application configures logging, never uvicorn
        # otaguard.access logs each request instead: no query string, with the identity
        access_log=False,
        server_header=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=max(1, int(graceful_seconds)),
        limit_concurrency=max_connections,
        # uvloop's event loop and TLS (in C) with httptools' parser: asyncio's TLS layer and
        # h11 were over half of a metadata request's server CPU (ADR 0016)
        loop="uvloop",
        lifespan="on",
        # scope["client"] must be the TCP peer: whether a forwarded client certificate is
        # taken depends on it, so no X-Forwarded-For may rewrite it.
        proxy_headers=False,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        # Client certificates are asked for, not required: the operator API (bearer
        # token) and EST enrollment (token) serve clients without one. A certificate that
        # is presented must verify against the device CA, or the handshake fails.
        ssl_ca_certs=device_chain,
        ssl_cert_reqs=ssl.CERT_OPTIONAL if device_chain else ssl.CERT_NONE,
        # Puts the verified peer certificate into the ASGI scope (uvicorn does not).
        # With the header deadline and size bound against slow clients (slowloris).
        http=TlsScopeProtocol.with_header_timeout(settings.header_timeout),
    )
    try:
        config.load()
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"cannot load the TLS certificate {certfile} and key {keyfile}: {e}"
        ) from e
    renewer: CertificateRenewer | None = None
    if config.ssl is not None and source is not None:
        # Mozilla "modern": TLS 1.3 only (no CBC suites, no RSA key exchange), and only the
        # X25519, P-256 and P-384 groups.
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_3
        # No TLS 1.3 session tickets: no client of this server resumes a session (each
        # device poll is a fresh handshake, its certificate verified again), and each ticket
        # cost an encryption of the session, the client certificate included, and a write.
        config.ssl.num_tickets = 0
        if settings.manufacturer_ca is not None:
            # Factory certificates pass the handshake too; they are good for enrollment
            # only (the device gate accepts only the device CA's signature).
            try:
                config.ssl.load_verify_locations(cafile=str(settings.manufacturer_ca))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(
                    f"cannot load the manufacturer CA {settings.manufacturer_ca}: {e}"
                ) from e
        if not restrict_groups(config.ssl):
            logger.warning("cannot restrict TLS groups here; OpenSSL's defaults apply")
        renewer = CertificateRenewer(source, config.ssl)
    return config, ca_cert, app, renewer


def run_server(settings: ServerSettings) -> None:
    """Serve until interrupted (SIGINT/SIGTERM), HTTPS with the data directory's CA.

    Creates the CA (``DATA/ca``), a server certificate for ``settings.host``
    (``DATA/tls``) and the operator token on first run.

    Raises:
        ConfigError: the CA, certificate or token is unusable, or the database URL is.
        DatabaseBehindError: the shared database is not at this code's schema revision.
        ServerStorageError: the database or blob directory cannot be opened.
    """
    config, _, _, renewer = _config(settings)
    scheme = "http" if settings.insecure_http else "https"
    # Bound before serving: a taken port is one line and its own exit code, not uvicorn's
    # log line and exit 1 after start-up.
    sock = _bind(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    logger.info("listening on %s://%s:%d", scheme, host, sock.getsockname()[1])
    logger.info(
        "database: %s",
        mask_url(settings.database_url)
        if settings.database_url
        else f"embedded SQLite {settings.data_dir / 'otaguard.db'}",
    )
    if renewer is not None:
        renewer.start()
    # What start-up made (the application, its routes and schema, keys, parsed metadata)
    # lives as long as the process: out of the collector's generations, so that a full
    # collection no longer walks it (a pause of every request in flight; the check-in
    # bench's p99 and CPU both improved). Here, not in the application: a test process
    # starts many applications, whose garbage must stay collectable.
    gc.collect()
    gc.freeze()
    try:
        _Server(config, tls_handshake_timeout=settings.tls_handshake_timeout).run(sockets=[sock])
    finally:
        sock.close()
        if renewer is not None:
            renewer.stop()


def _bind(settings: ServerSettings) -> socket.socket:
    """The server's listening socket, bound to ``settings.host`` and ``settings.port``.

    Raises:
        AddressInUseError: another process holds that address and port.
        ConfigError: the address cannot be bound otherwise (not local, no permission).
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it Nagle's algorithm and the client's delayed ACK add ~40 ms to
    # every response written in two parts (headers, body).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
    except OSError as e:
        sock.close()
        where = f"{settings.host}:{settings.port}"
        if e.errno == errno.EADDRINUSE:
            raise AddressInUseError(
                f"cannot listen on {where}: another process is listening there (stop it, "
                "or choose another --port)"
            ) from e
        raise ConfigError(f"cannot bind {where}: {e.strerror}") from e
    return sock


def _url_host(host: str) -> str:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if addr.is_unspecified:
        return "127.0.0.1" if addr.version == 4 else "[::1]"
    return f"[{addr}]" if addr.version == 6 else str(addr)


@dataclass
class RunningServer:
    """A server running in a background thread of this process; stop it when done.

    Attributes:
        base_url: ``https://127.0.0.1:<port>`` (the actual port when 0 was asked).
        ca_cert: the CA certificate clients must trust (``None`` with insecure HTTP).
        operator_token: the bearer token for ``/api/v1``.
        data_dir: the server's data directory.
        online_public_key: the server's online public key file (``--online-key``).
        app: the application (its ``state`` holds the stores and background tasks).
        ssl_context: the server's TLS context (``None`` with insecure HTTP).
    """

    base_url: str
    ca_cert: Path | None
    operator_token: str
    data_dir: Path
    online_public_key: Path
    app: FastAPI
    ssl_context: ssl.SSLContext | None
    _server: uvicorn.Server
    _thread: threading.Thread
    _socket: socket.socket
    #: keeps the server certificate valid while running (``None`` with insecure HTTP)
    renewer: CertificateRenewer | None = None

    def stop(self) -> None:
        """Shut the server down and wait for its thread (idempotent)."""
        if self.renewer is not None:
            self.renewer.stop()
        self._server.should_exit = True
        self._thread.join(SHUTDOWN_TIMEOUT_SECONDS + 5)
        self._socket.close()
        if self._thread.is_alive():
            logger.warning("server thread did not stop in time")

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server_in_thread(
    settings: ServerSettings, *, clock: Callable[[], dt.datetime] | None = None
) -> RunningServer:
    """Start the server in a daemon thread and return once it accepts connections.

    Port 0 binds a free port; :attr:`RunningServer.base_url` names the actual one.
    Used by the demo and the tests; production uses :func:`run_server`. ``clock``
    replaces the server's notion of now (tests of expiry).

    Raises:
        ConfigError: the server did not come up (see the log for the cause).
    """
    config, ca_cert, app, renewer = _config(
        settings, graceful_seconds=IN_THREAD_SHUTDOWN_TIMEOUT_SECONDS, clock=clock
    )
    sock = _bind(settings)
    port = sock.getsockname()[1]
    server = _Server(config, tls_handshake_timeout=settings.tls_handshake_timeout)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="otaguard-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(SHUTDOWN_TIMEOUT_SECONDS)
            sock.close()
            raise ConfigError("the update server failed to start")
        time.sleep(0.02)
    if renewer is not None:
        renewer.start()
    scheme = "http" if settings.insecure_http else "https"
    base_url = f"{scheme}://{_url_host(settings.host)}:{port}"
    logger.info("server running in-process at %s", base_url)
    return RunningServer(
        base_url=base_url,
        ca_cert=ca_cert,
        operator_token=load_or_create_operator_token(settings.data_dir),
        data_dir=settings.data_dir,
        online_public_key=settings.data_dir / ONLINE_PUBLIC_KEY_FILE,
        app=app,
        ssl_context=config.ssl,
        _server=server,
        _thread=thread,
        _socket=sock,
        renewer=renewer,
    )
