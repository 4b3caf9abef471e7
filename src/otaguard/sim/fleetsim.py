"""Fleet simulator: N lightweight devices in one asyncio process against a real server.

Each simulated device is a serial, a P-256 key and its certificate (one PEM file in the
identity cache, nothing else on disk), and an in-memory slot state. It runs the real
device protocol with the agent's own code:

1. **enroll** (once; the cache makes reruns fast): the operator token registers the
   serial (``fleet add-device``), the device sends its CSR to EST with the single-use
   token, and :func:`~otaguard.agent.identity.parse_enrollment_answer` checks the chain;
2. **check in** over a fresh mutual-TLS connection with its certificate: a nonce, a
   :class:`~otaguard.model.manifest.DeviceManifest` signed by its key
   (:func:`~otaguard.crypto.envelope.sign_envelope`), the answer parsed by
   :mod:`otaguard.agent.checkin`'s parsers;
3. **verify** the director's answer (:func:`~otaguard.agent.director.verify_director_targets`
   against the director root followed by the fleet's
   :class:`~otaguard.sim._repo_view.RepositoryView`), match it against the image
   repository's python-tuf-verified targets (:func:`match_image_repository`) and check
   it against what runs (:func:`~otaguard.agent.updater.select_update`);
4. **install** in memory: the slot flips and the next manifest reports ``updated``, or,
   for a device drawn into the failing fraction ``fail_rate`` when the instructed release
   is ``fail_release``, ``rolled-back`` (the image is remembered as rejected, as the real
   agent does). A refusal that stands for an attack is reported as an attack flag.

Any error of a device (refused, malformed or hostile answer, transport) is counted by
kind in :class:`FleetStats`, never raised: the fleet goes on.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import logging
import os
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import TargetFile

from otaguard.agent.attack_flags import flag_for
from otaguard.agent.checkin import (
    CHECKIN_PATH,
    MAX_ANSWER_BYTES,
    NONCE_PATH,
    NONCE_REFUSAL_MARK,
    parse_answer,
    parse_checkin_answer,
    parse_nonce_answer,
)
from otaguard.agent.director import match_image_repository, verify_director_targets
from otaguard.agent.fetcher import create_ssl_context
from otaguard.agent.identity import EST_ENROLL_PATH, build_csr, parse_enrollment_answer
from otaguard.agent.monotonic import Floor
from otaguard.agent.updater import select_update
from otaguard.crypto.envelope import sign_envelope
from otaguard.model.errors import (
    AccessDeniedError,
    DirectorMetadataError,
    OperatorError,
    OtaguardError,
    TransportError,
)
from otaguard.model.manifest import BootMeasurement, DeviceManifest, InstalledTarget
from otaguard.model.release import ReleaseInfo
from otaguard.model.version import Version
from otaguard.sim._http import AsyncConnection
from otaguard.sim._repo_view import RepositoryView
from otaguard.sim.scenarios import BootSession, send_telemetry

__all__ = ["FleetSim", "FleetStats", "SimDevice", "SimSettings"]

logger = logging.getLogger(__name__)

#: devices talking to the server at once; two cores serve far fewer, more only queues
#: connections in the server's backlog and inflates the measured latency
DEFAULT_CONCURRENCY: Final = 32
#: one request's step (connect, handshake, answer) may take this long before it fails
DEFAULT_TIMEOUT_S: Final = 30.0
#: the enrollment answer (PKCS#7 chain, base64) and the registration answer are small
MAX_ENROLL_BYTES: Final = 64 * 1024
#: what a simulated device accepts as an image length (the agent's default cap)
MAX_IMAGE_BYTES: Final = 4 * 1024 * 1024 * 1024
#: a static file the bench fetches (a root or timestamp: a few KiB)
MAX_STATIC_BYTES: Final = 1024 * 1024
#: devices' TLS contexts kept built (about 30 KiB each: 2,048 are about 60 MiB)
MAX_TLS_CONTEXTS: Final = 2048
#: the fleet's latency samples kept for percentiles (a 10,000-device run stays small)
MAX_SAMPLES: Final = 1_000_000
_JSON: Final = {"Content-Type": "application/json"}


@dataclass(frozen=True, kw_only=True)
class SimSettings:
    """What the simulated fleet talks to and how it behaves.

    ``trusted_root`` (the image repository's root.json) and ``director_root`` are the
    trust anchors every simulated device is provisioned with; they have no default.
    """

    server_url: str
    ca_cert: Path
    trusted_root: bytes
    director_root: bytes
    hardware_id: str
    devices: int
    identity_dir: Path
    serial_prefix: str = "sim"
    fail_rate: float = 0.0
    fail_release: str | None = None
    initial_version: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    timeout: float = DEFAULT_TIMEOUT_S
    #: send a telemetry report each cycle and after each install (ADR 0026)
    telemetry: bool = False
    #: devices running this release crash-loop: :data:`CRASH_BOOTS` reboots per cycle
    #: (its health check passes: only telemetry shows it)
    crash_release: str | None = None
    #: devices' TLS contexts kept built; a load generator sets the fleet's size, so it
    #: does not spend its CPU rebuilding them (a 10,000-device bench: about 300 MiB)
    tls_contexts_kept: int = MAX_TLS_CONTEXTS

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise OperatorError("the fleet needs at least one device")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise OperatorError("the fail rate is a fraction between 0 and 1")
        if self.fail_rate and self.fail_release is None:
            raise OperatorError("a fail rate needs the release that fails (--fail-release)")
        if self.concurrency < 1:
            raise OperatorError("the concurrency is at least 1")


@dataclass
class SimDevice:
    """One simulated device: identity, slot state, what it reports next."""

    serial: str
    identity: Path
    signer: Signer
    installed: InstalledTarget
    slot: str = "A"
    floor: Floor = field(default_factory=lambda: Floor(Version.parse("0.0.0"), 0))
    last_result: dict[str, str] = field(default_factory=dict)
    rejected: set[str] = field(default_factory=set)
    attack_flags: set[str] = field(default_factory=set)
    #: drawn once from the serial: this device fails the failing release
    fails: bool = False
    #: the telemetry boot session (:mod:`otaguard.sim.scenarios`)
    session: BootSession = field(default_factory=BootSession)
    #: a tampered slot: the boot measurement the device reports instead of its image's
    boot_sha256: str | None = None
    #: the nonce the last accepted check-in handed out for the next one (ADR 0036)
    next_nonce: str | None = None
    #: goes silent once told to install (:func:`otaguard.sim.scenarios.go_silent`)
    goes_silent: bool = False
    #: gone silent: it checks in no more
    silent: bool = False


@dataclass
class FleetStats:
    """What a run produced: counts, latencies, errors by kind, versions."""

    devices: int = 0
    enrolled: int = 0
    checkins: int = 0
    #: GETs of a static file (:meth:`FleetSim.fetch_static`), the bench's reference
    static_fetches: int = 0
    installs: Counter[str] = field(default_factory=Counter)
    failed_installs: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    #: the first message of each error kind (one line, for the summary)
    error_examples: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    running: Counter[str] = field(default_factory=Counter)
    #: devices that went silent after being told to install (scenario)
    silent: int = 0
    elapsed: float = 0.0

    def error(self, e: OtaguardError) -> None:
        """Count one device error by its kind."""
        kind = type(e).__name__
        self.errors[kind] += 1
        self.error_examples.setdefault(kind, " ".join(str(e).split())[:300])

    @property
    def rate(self) -> float:
        """Accepted check-ins (or static fetches) per second over the run."""
        done = self.checkins + self.static_fetches
        return done / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (0-100) of check-in latency in seconds, 0 when none."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


ProgressFn = Callable[[FleetStats], None]


def _draw(serial: str, rate: float) -> bool:
    """Whether ``serial`` is in the failing fraction ``rate`` (stable across reruns)."""
    digest = hashlib.sha256(b"otaguard-sim-fail\0" + serial.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class _TlsContexts:
    """Each device's TLS context (its certificate and key), the most recent kept.

    Building one parses the key and chain (about 1.6 ms of the load generator's CPU) and
    holds about 30 KiB: a bounded cache keeps a large fleet memory-light while a small
    one (or the devices of one wave) builds each context once.
    """

    def __init__(self, *, kept: int = MAX_TLS_CONTEXTS) -> None:
        self._kept = kept
        self._cache: OrderedDict[tuple[str, Path], ssl.SSLContext] = OrderedDict()

    def get(self, dev: SimDevice, ca_cert: Path) -> ssl.SSLContext:
        key = (dev.serial, ca_cert)
        ctx = self._cache.pop(key, None)
        if ctx is None:
            ctx = create_ssl_context(ca_file=ca_cert, client_cert=dev.identity)
        self._cache[key] = ctx
        while len(self._cache) > self._kept:
            self._cache.popitem(last=False)
        return ctx


class FleetSim:
    """A simulated fleet against one server (see the module docstring)."""

    def __init__(self, settings: SimSettings, *, progress: ProgressFn | None = None) -> None:
        self.settings = settings
        self.view = RepositoryView(
            trusted_root=settings.trusted_root, director_root=settings.director_root
        )
        self.devices: list[SimDevice] = []
        self.stats = FleetStats(devices=settings.devices)
        self._progress = progress
        self._busy: dict[str, asyncio.Lock] = {}
        self._tls = _TlsContexts(kept=settings.tls_contexts_kept)

    # -- enrollment ----------------------------------------------------------------------
    def serials(self) -> list[str]:
        """The fleet's serials: ``<prefix>-00001`` ..."""
        width = max(5, len(str(self.settings.devices)))
        return [
            f"{self.settings.serial_prefix}-{i:0{width}d}"
            for i in range(1, self.settings.devices + 1)
        ]

    def _cached(self, serial: str) -> Path:
        return self.settings.identity_dir / f"{serial}.pem"

    async def _enroll_one(self, serial: str, operator_token: str) -> Path:
        """Register and enroll ``serial`` (or take its cached identity); its PEM file."""
        path = self._cached(serial)
        if path.exists():
            return path
        s = self.settings
        plain = create_ssl_context(ca_file=s.ca_cert)
        async with AsyncConnection(s.server_url, tls=plain, timeout=s.timeout) as conn:
            body = json.dumps({"serial": serial, "hardware_id": s.hardware_id}).encode()
            status, data = await conn.request(
                "POST",
                "/api/v1/devices",
                body=body,
                headers={**_JSON, "Authorization": f"Bearer {operator_token}"},
                max_body=MAX_ENROLL_BYTES,
            )
            if status == 409:
                raise OperatorError(
                    f"{serial} is registered but its identity is not in {s.identity_dir}: "
                    "use another --serial-prefix or the identity cache of the first run"
                )
            # 201 Created is the registration's success.
            answer = parse_answer(
                200 if status == 201 else status, data, f"registration of {serial}"
            )
            token = answer.get("token")
            if not isinstance(token, str):
                raise TransportError(f"registration of {serial}: the answer has no token")
            key = ec.generate_private_key(ec.SECP256R1())
            auth = base64.b64encode(f"{serial}:{token}".encode()).decode("ascii")
            status, data = await conn.request(
                "POST",
                EST_ENROLL_PATH,
                body=base64.encodebytes(build_csr(key, serial)),
                headers={
                    "Content-Type": "application/pkcs10",
                    "Content-Transfer-Encoding": "base64",
                    "Authorization": f"Basic {auth}",
                },
                max_body=MAX_ENROLL_BYTES,
            )
        if status != 200:
            parse_answer(status, data, f"enrollment of {serial}")  # raises the mapped error
        chain = parse_enrollment_answer(data, key.public_key(), serial)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ) + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)
        return path

    def _load(self, serial: str, path: Path, installed: InstalledTarget) -> SimDevice:
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise OperatorError(f"the cached identity {path} holds no EC key")
        x509.load_pem_x509_certificates(data)  # a corrupt cache fails here, not in TLS
        s = self.settings
        fails = s.fail_release is not None and _draw(serial, s.fail_rate)
        return SimDevice(serial, path, CryptoSigner(key), installed, fails=fails)

    async def enroll(self, *, operator_token: str) -> None:
        """Enroll every device (cached identities are reused), then pick what they run.

        The devices start on ``initial_version`` (default: the oldest release for the
        hardware id), as the image repository lists it, so their measured boot agrees;
        the operator token registers new devices and reads the repository for that.

        Raises:
            OperatorError: no release to start from, or no identity and no token.
        """
        s = self.settings
        s.identity_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        serials = self.serials()
        gate = asyncio.Semaphore(s.concurrency)

        async def one(serial: str) -> Path | None:
            async with gate:
                try:
                    return await self._enroll_one(serial, operator_token)
                except OtaguardError as e:
                    self.stats.error(e)
                    return None

        paths = await asyncio.gather(*(one(x) for x in serials))
        enrolled = [(x, p) for x, p in zip(serials, paths, strict=True) if p is not None]
        if not enrolled:
            raise OperatorError(f"no device could enroll: {dict(self.stats.error_examples)}")
        installed = await self._initial(operator_token)
        self.devices = [self._load(x, p, installed) for x, p in enrolled]
        self.stats.enrolled = len(self.devices)
        self._count_running()

    async def _initial(self, operator_token: str) -> InstalledTarget:
        """What the fleet starts on, from the verified view (read with the operator token)."""
        s = self.settings
        plain = create_ssl_context(ca_file=s.ca_cert)
        bearer = {"Authorization": f"Bearer {operator_token}"}
        async with AsyncConnection(
            s.server_url, tls=plain, timeout=s.timeout, headers=bearer
        ) as conn:
            await self.view.ensure_images(conn)
        offers = []
        for target in self.view.targets().values():
            try:
                info = ReleaseInfo.from_custom(target.unrecognized_fields.get("custom"))
            except OtaguardError:
                continue  # a malformed entry is no release (the agent skips it too)
            if s.hardware_id in info.hardware_ids:
                offers.append((target, info))
        if s.initial_version is not None:
            want = Version.parse(s.initial_version)
            offers = [o for o in offers if o[1].version == want]
        if not offers:
            raise OperatorError(
                f"the image repository lists no release {s.initial_version or ''} for "
                f"hardware {s.hardware_id} to start the fleet on"
            )
        return _installed(*min(offers, key=lambda o: o[1].version))

    # -- check-ins ------------------------------------------------------------------------
    def _count_running(self) -> None:
        self.stats.running = Counter(d.installed.version for d in self.devices)
        self.stats.silent = sum(d.silent for d in self.devices)

    def _manifest(self, dev: SimDevice, nonce: str) -> DeviceManifest:
        return DeviceManifest(
            serial=dev.serial,
            nonce=nonce,
            time=_now(),
            installed=dev.installed,
            last_result=dict(dev.last_result),
            boot=BootMeasurement(
                sha256=dev.boot_sha256 or dev.installed.sha256, slot=dev.slot, attested=False
            ),
            quote=None,
            attack_flags=tuple(sorted(dev.attack_flags)),
        )

    async def _post_manifest(
        self, conn: AsyncConnection, dev: SimDevice, nonce: str, *, retry: bool
    ) -> tuple[str, DeviceManifest, dict[str, Any]] | None:
        """Post ``dev``'s manifest answering ``nonce``: (the nonce, the manifest, the
        answer), or ``None`` when ``retry`` and the server refused the nonce (ask for one)."""
        manifest = self._manifest(dev, nonce)
        envelope = sign_envelope(dev.signer, manifest.to_dict())
        status, data = await conn.request(
            "POST", CHECKIN_PATH, body=envelope, headers=_JSON, max_body=MAX_ANSWER_BYTES
        )
        try:
            return nonce, manifest, parse_answer(status, data, "check-in")
        except AccessDeniedError as e:
            if retry and NONCE_REFUSAL_MARK in str(e):
                return None
            raise

    async def _exchange(
        self, conn: AsyncConnection, dev: SimDevice
    ) -> tuple[str, DeviceManifest, dict[str, Any]]:
        """The check-in's requests: with the kept nonce if any, else (or when it is
        refused) a fresh one first. Returns (the nonce, the manifest, the acceptance)."""
        kept, dev.next_nonce = dev.next_nonce, None  # single use, whatever the answer
        if kept is not None:  # one request, as the agent makes it (ADR 0036)
            answered = await self._post_manifest(conn, dev, kept, retry=True)
            if answered is not None:
                return answered
        status, data = await conn.request(
            "POST", NONCE_PATH, headers=_JSON, max_body=MAX_ANSWER_BYTES
        )
        fresh, _ = parse_nonce_answer(parse_answer(status, data, "check-in nonce request"))
        answered = await self._post_manifest(conn, dev, fresh, retry=False)
        if answered is None:  # pragma: no cover - retry=False raises instead
            raise TransportError("check-in: no answer")
        return answered

    async def check_in(self, dev: SimDevice) -> None:
        """One full check-in of ``dev``, then verification and install of the answer.

        Raises:
            OtaguardError: refused, malformed or hostile answer, transport failure, or a
                refused instruction (then also remembered as an attack flag).
        """
        s = self.settings
        start = time.perf_counter()
        async with AsyncConnection(
            s.server_url, tls=self._tls.get(dev, s.ca_cert), timeout=s.timeout
        ) as conn:
            if s.telemetry:
                if dev.installed.version == s.crash_release:
                    dev.session.crash()  # it rebooted over and over since the last poll
                await send_telemetry(conn, dev)
            nonce, manifest, accepted = await self._exchange(conn, dev)
            result = parse_checkin_answer(accepted, nonce=nonce, serial=dev.serial)
            if result.next_nonce is not None:
                dev.next_nonce = result.next_nonce.nonce
            elapsed = time.perf_counter() - start
            dev.attack_flags.difference_update(manifest.attack_flags)
            self.stats.checkins += 1
            if len(self.stats.latencies) < MAX_SAMPLES:
                self.stats.latencies.append(elapsed)
            try:
                root = await self.view.ensure_director(conn)
                if result.director is None:
                    raise DirectorMetadataError(
                        "the server gave no director instruction at check-in"
                    )
                instruction = verify_director_targets(
                    result.director,
                    root=root,
                    serial=dev.serial,
                    hardware_id=s.hardware_id,
                    nonce=nonce,
                    now=dt.datetime.now(dt.UTC),
                )
                if instruction.target is None:
                    return
                if dev.goes_silent:
                    # Told to install: it never installs or checks in again (a device
                    # bricked by the update, or cut off); only the server's silence
                    # signal notices.
                    dev.silent = True
                    logger.info("%s: told to install %s, going silent", dev.serial,
                                instruction.target.path)  # fmt: skip
                    return
                await self.view.ensure_images(conn, needs=instruction.target.path)
                offer = match_image_repository(
                    instruction.target,
                    self.view.targets().get(instruction.target.path),
                    hardware_id=s.hardware_id,
                )
                sel = select_update(
                    [offer],
                    running=Version.parse(dev.installed.version),
                    floor=dev.floor,
                    max_length=MAX_IMAGE_BYTES,
                    rejected=frozenset(dev.rejected),
                )
            except OtaguardError as e:
                flag = flag_for(e)
                if flag is not None:
                    dev.attack_flags.add(flag)
                raise
        if sel.downgrade:
            dev.attack_flags.add("downgrade")
        if sel.chosen is not None:
            self._install(dev, sel.chosen.target, sel.chosen.info)
            if s.telemetry:  # the report of the device's first boot of what it installed
                async with AsyncConnection(
                    s.server_url, tls=self._tls.get(dev, s.ca_cert), timeout=s.timeout
                ) as conn:
                    await send_telemetry(conn, dev)

    def _install(self, dev: SimDevice, target: TargetFile, info: ReleaseInfo) -> None:
        """The simulated install: the slot flips, or the health check fails (rolled back)."""
        version = str(info.version)
        report = {"target": target.path, "version": version, "time": _now()}
        if dev.fails and version == self.settings.fail_release:
            dev.session.reboot(rollback=True)  # booted it, failed, booted the old one
            dev.rejected.add(str(target.hashes["sha256"]))
            dev.last_result = {
                **report,
                "outcome": "rolled-back",
                "error": "health",
                "detail": "simulated health-check failure",
            }
            self.stats.failed_installs[version] += 1
            return
        dev.installed = _installed(target, info)
        dev.session.reboot()
        dev.slot = "B" if dev.slot == "A" else "A"
        dev.floor = Floor(info.version, info.security_counter)
        dev.last_result = {**report, "outcome": "updated", "detail": "simulated install"}
        self.stats.installs[version] += 1

    async def fetch_static(self, dev: SimDevice, path: str) -> None:
        """GET ``path`` over a fresh mutual-TLS connection of ``dev`` (the static-file
        reference a check-in's cost is compared with).

        Raises:
            TransportError: the request failed or was not answered 200.
        """
        s = self.settings
        start = time.perf_counter()
        async with AsyncConnection(
            s.server_url, tls=self._tls.get(dev, s.ca_cert), timeout=s.timeout
        ) as conn:
            status, _ = await conn.request("GET", path, max_body=MAX_STATIC_BYTES)
        if status != 200:
            raise TransportError(f"GET {path}: server answered {status}")
        self.stats.static_fetches += 1
        if len(self.stats.latencies) < MAX_SAMPLES:
            self.stats.latencies.append(time.perf_counter() - start)

    async def _one(self, dev: SimDevice, static_path: str | None) -> None:
        if dev.silent:
            return
        async with self._busy[dev.serial]:
            try:
                if static_path is not None:
                    await self.fetch_static(dev, static_path)
                    return
                await self.check_in(dev)
            except OtaguardError as e:
                self.stats.error(e)

    async def run(
        self,
        *,
        cycles: int | None = None,
        duration: float | None = None,
        static_path: str | None = None,
    ) -> FleetStats:
        """Check every device in ``cycles`` times, or round after round for ``duration`` s.

        Rounds go device by device with at most ``concurrency`` check-ins at a time; the
        progress callback sees the stats twice a second. With ``static_path`` each step
        is a GET of that path instead (:meth:`fetch_static`).
        """
        if (cycles is None) == (duration is None):
            raise OperatorError("give either cycles or a duration")
        if not self.devices:
            raise OperatorError("no enrolled device: enroll first")
        s = self.settings
        self._busy = {d.serial: asyncio.Lock() for d in self.devices}  # this loop's
        deadline = None if duration is None else time.monotonic() + duration
        queue: asyncio.Queue[SimDevice] = asyncio.Queue(maxsize=s.concurrency * 2)

        async def feed() -> None:
            done = 0
            while cycles is None or done < cycles:
                for dev in self.devices:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    await queue.put(dev)
                done += 1

        async def work() -> None:
            while True:
                dev = await queue.get()
                try:
                    await self._one(dev, static_path)
                finally:
                    queue.task_done()

        async def tick() -> None:
            while True:
                await asyncio.sleep(0.5)
                self._snapshot(started)
                if self._progress is not None:
                    self._progress(self.stats)

        started = time.perf_counter()
        workers = [asyncio.create_task(work()) for _ in range(s.concurrency)]
        ticker = asyncio.create_task(tick())
        try:
            await feed()
            await queue.join()
        finally:
            for task in [*workers, ticker]:
                task.cancel()
            await asyncio.gather(*workers, ticker, return_exceptions=True)
        self._snapshot(started)
        if self._progress is not None:
            self._progress(self.stats)
        return self.stats

    def _snapshot(self, started: float) -> None:
        self.stats.elapsed = time.perf_counter() - started
        self._count_running()


def _installed(target: TargetFile, info: ReleaseInfo) -> InstalledTarget:
    return InstalledTarget(
        name=target.path,
        length=target.length,
        sha256=str(target.hashes["sha256"]),
        version=str(info.version),
        security_counter=info.security_counter,
    )
