"""Soak: installs against a running server, cut at random moments, checked after each.

``make soak`` (``tools/soak.py``) and ``tests/integration/test_soak.py`` run this. One real
``otaguard server`` process (its own data directory, SQLite) serves an offline-signed
repository; a few devices are provisioned and enrolled through the library, as the
factory does. The soak goes in rounds: each publishes a new release (a few KiB from the
previous one; full image only, zstd, or zstd and a delta from the previous, in turn), then
every device installs it in one *run*:

1. ``otaguard agent DIR update`` starts as a real process; after a random delay drawn
   over an uninterrupted install's measured duration, either the agent's process group
   is SIGKILLed (a power cut), or -- in about one run in :data:`SERVER_KILL_ONE_IN` --
   the *server's* is, and the server is started again on the same data directory and
   port while the agent runs on against it;
2. the device powers on (:meth:`Device.boot`, the simulated bootloader ``agent boot``
   runs) and updates again (:meth:`Device.update`, what ``agent update`` runs) until the
   install ends, retrying while the server is away;
3. the run is checked: the booted slot's bytes hash to its published image (the
   bootloader's own check and an independent hash against the repository), the device
   runs the round's release with nothing in progress, its anti-rollback floor is at the
   release and never went down; after a server kill, a fresh TUF client verifies the
   whole chain the server serves from the offline root (and that no timestamp or snapshot
   version went back); at the end, every served blob too.

A run that fails any check is *unsafe*; the soak goes on and reports the first failures.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from otaguard.agent import Device, InstallState, Phase
from otaguard.agent.boot import slot_problem
from otaguard.model.errors import OperatorError, OtaguardError, TransportError
from otaguard.model.version import Version
from otaguard.server.client import FleetClient
from otaguard.sim._soak_world import (
    HARDWARE_ID,
    PublishedImage,
    RepositoryAudit,
    ServerProcess,
    SoakRepository,
    agent_env,
    error_line,
    free_port,
    sha256_prefix,
)

__all__ = ["SERVER_KILL_ONE_IN", "RunOutcome", "SoakReport", "SoakSettings", "run_soak"]

logger = logging.getLogger(__name__)

#: about one run in this many kills the server instead of the agent
SERVER_KILL_ONE_IN: Final = 10
#: devices installing each round's release; more devices, fewer releases per run
DEFAULT_DEVICES: Final = 8
#: two cores: two agents at once, the server and its restarts take the rest
DEFAULT_WORKERS: Final = 2
#: small images keep a run short; still several network reads and resume checkpoints
DEFAULT_IMAGE_BYTES: Final = 2 * 1024 * 1024
#: the devices' resume checkpoints: several inside an image (a device's default, 32 MiB,
#: is larger than the whole soak image)
CHECKPOINT_BYTES: Final = 256 * 1024
#: an uninterrupted agent process installs a release in a few seconds here; a hung one
#: is a failure, not something to wait for
AGENT_TIMEOUT_S: Final = 120.0
#: updates after the cut before a run is declared stuck (each either progresses or meets
#: a server being restarted; a handful is plenty)
MAX_RESUME_ATTEMPTS: Final = 8
#: unsafe runs whose details the report keeps (the count is always exact)
MAX_FAILURES_KEPT: Final = 10
#: the devices' health check: a real command that passes in milliseconds, so the cuts
#: fall across the install's own steps rather than mostly inside an interpreter's start
#: (the health check's failure paths are tests/integration/test_power_loss.py's)
HEALTH_COMMAND: Final = ["true"]
#: how often the soak looks whether an agent has begun its install (a stat)
STATE_POLL_S: Final = 0.002
#: about one run in this many cuts from the agent's start (before the install's first
#: step: check-in, metadata refresh); the others from the install's first step
FROM_START_ONE_IN: Final = 4
#: the cut falls this far past an uninterrupted install's last step at most: a few land
#: after the commit, which must be as safe
CUT_WINDOW_SLACK: Final = 1.1


#: held while this process holds a device's lock (its in-process boot and update) and
#: while it starts an agent: a child between fork and exec holds a copy of every open
#: descriptor, a device's lock among them, so an agent started while another device's
#: update runs here could find that device "in use by another agent"
_FORK_LOCK: Final = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class SoakSettings:
    """How long and how wide the soak runs; ``seed`` makes its plan reproducible."""

    runs: int
    seed: int
    work_dir: Path
    devices: int = DEFAULT_DEVICES
    workers: int = DEFAULT_WORKERS
    image_bytes: int = DEFAULT_IMAGE_BYTES
    server_kill_one_in: int = SERVER_KILL_ONE_IN

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise OperatorError("the soak needs at least one run")
        if not 1 <= self.workers <= self.devices:
            raise OperatorError("workers must be between 1 and the number of devices")
        if self.image_bytes < 64 * 1024:
            raise OperatorError("images must be at least 64 KiB")
        if self.server_kill_one_in < 1:
            raise OperatorError("server kills: one run in N, N >= 1")


@dataclass(frozen=True)
class RunOutcome:
    """One run: what was cut, where the install stood, and whether it ended safe."""

    index: int
    device: str
    version: str
    server_kill: bool
    #: the agent's process was running when its SIGKILL came (agent runs only)
    agent_killed: bool
    #: where the install stood after the cut (its persisted phase), or where it ended
    cut_at: str
    #: updates retried because the server was away
    retries: int
    problem: str | None = None


@dataclass
class SoakReport:
    """The counts of a soak."""

    #: runs the soak was to make (fewer are made if a release cannot be served)
    planned: int = 0
    runs: int = 0
    safe: int = 0
    agent_kills: int = 0
    server_kills: int = 0
    #: agent runs whose agent had already exited when the cut came
    finished_before_cut: int = 0
    cut_at: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    releases: int = 0
    #: chains verified from the offline root by a fresh client (each publication, each
    #: server kill, the end)
    audits: int = 0
    blobs_checked: int = 0
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def add(self, run: RunOutcome) -> None:
        """Count one run."""
        self.runs += 1
        self.server_kills += run.server_kill
        self.agent_kills += run.agent_killed
        self.finished_before_cut += not run.server_kill and not run.agent_killed
        self.cut_at[run.cut_at] += 1
        self.retries += run.retries
        if run.problem is None:
            self.safe += 1
        elif len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(
                f"run {run.index} ({run.device}, {run.version}, "
                f"{'server' if run.server_kill else 'agent'} cut at {run.cut_at}): {run.problem}"
            )

    @property
    def ok(self) -> bool:
        """Every planned run was made and ended safe."""
        return self.safe == self.runs == self.planned and not self.failures

    def line(self) -> str:
        """The one-line summary."""
        where = ", ".join(f"{k} {n}" for k, n in sorted(self.cut_at.items()))
        return (
            f"soak: {self.safe}/{self.planned} safe ({self.agent_kills} agent kills, "
            f"{self.server_kills} server kills, {self.finished_before_cut} agents done before "
            f"the cut; cut at: {where}; {self.retries} retries while the server was away; "
            f"{self.releases} releases, {self.audits} repository audits, "
            f"{self.blobs_checked} blobs verified; {self.elapsed:.0f} s)"
        )


ProgressFn = Callable[[SoakReport], None]


@dataclass(frozen=True)
class _Plan:
    index: int
    device: int
    server_kill: bool
    #: the cut counts from the install's first step, not from the agent's start
    in_install: bool
    #: where in the cut window, 0..1
    at: float


class _Soak:
    """The running soak: world, devices and what each device must never go below."""

    def __init__(self, settings: SoakSettings, server: ServerProcess, repo: SoakRepository):
        self.settings = settings
        self.server = server
        self.repo = repo
        self.audit = RepositoryAudit(
            trusted_root=(repo.repo.metadata_dir / "root.json").read_bytes(), server=server
        )
        self.devices: list[Device] = []
        self.floors: dict[str, tuple[Version, int]] = {}
        #: seconds from an agent's start to its install's first step, and of the install
        self.windows = (1.0, 1.0)
        self._audit_lock = threading.Lock()

    # -- setup --------------------------------------------------------------------
    def provision(self, name: str, version: str) -> Device:
        """A device at ``version``, registered and enrolled as the factory does."""
        dev = Device.provision(
            self.settings.work_dir / "devices" / name,
            server_url=self.server.base_url,
            root_json=self.repo.repo.metadata_dir / "root.json",
            ca_pem=self.server.ca_cert,
            hardware_id=HARDWARE_ID,
            serial=name,
            factory_image=self.repo.image_file(version),
            factory_version=version,
            health_command=HEALTH_COMMAND,
        )
        # checkpoints inside the small image, so cuts mid-stream resume from one
        config = dataclasses.replace(dev.config, resume_checkpoint_bytes=CHECKPOINT_BYTES)
        config.save(dev.paths.config)
        dev = Device(dev.paths.root)
        with FleetClient(
            server_url=self.server.base_url,
            ca_cert=self.server.ca_cert,
            token=self.server.operator_token,
        ) as fleet:
            token = fleet.add_device(name, HARDWARE_ID).token
        dev.enroll(token, key_store=dev.key_store)
        return dev

    def publish(self, version: str) -> PublishedImage:
        """Publish ``version`` and wait until a fresh client verifies it served."""
        image = self.repo.publish(version)
        with self._audit_lock:
            self.audit.wait_targets(self.repo.repo.latest_version("targets"))
        return image

    def calibrate(self, version: str) -> None:
        """Time an uninterrupted agent process installing ``version``: from its start to
        the install's first persisted step, and from there to its last (the commit; the
        process then still reports and exits)."""
        dev = self.provision("soak-calibration", self.repo.versions[0])
        state = dev.paths.install_state
        t0 = time.monotonic()
        proc = _agent(dev.paths.root, "update")
        _wait_install_start(proc, state, _mtime(state))
        first = last = time.monotonic()
        seen = _mtime(state)
        while proc.poll() is None and time.monotonic() - t0 < AGENT_TIMEOUT_S:
            if (now := _mtime(state)) != seen:
                seen, last = now, time.monotonic()
            time.sleep(STATE_POLL_S)
        if proc.wait(AGENT_TIMEOUT_S) != 0:
            raise OtaguardError(f"the calibration install of {version} failed")
        self.windows = (first - t0, (last - first) * CUT_WINDOW_SLACK)
        logger.info("to the install: %.2f s; the install: %.2f s", *self.windows)

    # -- one run ----------------------------------------------------------------------
    def run(self, plan: _Plan, version: str) -> RunOutcome:
        """Install ``version`` on a device with one cut; check the device after."""
        dev = self.devices[plan.device]
        name = dev.config.serial
        mark = _mtime(dev.paths.install_state)
        proc = _agent(dev.paths.root, "update")
        if plan.in_install:
            _wait_install_start(proc, dev.paths.install_state, mark)
            delay = plan.at * self.windows[1]
        else:  # from the start: interpreter, check-in, metadata refresh, selection
            delay = (0.5 + 0.5 * plan.at) * self.windows[0]
        done = _wait(proc, delay)
        killed = False
        if plan.server_kill:
            self.server.kill_and_restart()
            proc.wait(AGENT_TIMEOUT_S)  # it fails against the dead server, or finishes
        elif not done:
            _power_cut(proc)
            killed = True
        cut_at = _cut_at(dev, version)
        retries = 0
        try:
            retries = self._finish(dev)
            problem = self._check_device(dev, self.repo.images[version])
            if problem is None and plan.server_kill:
                problem = self._check_repository()
        except (OtaguardError, OSError) as e:  # the device's files unreadable: unsafe too
            problem = error_line(e)
        return RunOutcome(plan.index, name, version, plan.server_kill, killed, cut_at, retries,
                          problem)  # fmt: skip

    def _finish(self, dev: Device) -> int:
        """Power on, then update until the install ends; returns the retries needed."""
        with _FORK_LOCK:
            dev.boot()
        retries = 0
        for _ in range(MAX_RESUME_ATTEMPTS):
            if not self.server.up.wait(timeout=AGENT_TIMEOUT_S):
                raise TransportError("the server did not come back")
            try:
                with _FORK_LOCK:
                    result = dev.update()
            except TransportError:
                retries += 1
                time.sleep(0.2)
                continue
            if result.outcome == "rebooting":
                with _FORK_LOCK:
                    dev.boot()
                continue
            if result.outcome not in ("updated", "up-to-date"):
                raise OtaguardError(f"the install ended {result.outcome}: {result.detail}")
            return retries
        raise OtaguardError(f"no install end after {MAX_RESUME_ATTEMPTS} updates")

    def _check_device(self, dev: Device, want: PublishedImage) -> str | None:  # noqa: PLR0911
        """The first problem with the device after a run, or ``None``."""
        st = dev.status()
        name = dev.config.serial
        booted = st.booted
        if booted is None or booted.slot is None or booted.recovery:
            return f"not booted into a slot: {booted}"
        image = st.bootenv.slots.get(booted.slot)
        if image is None:
            return f"booted slot {booted.slot} records no image"
        problem = slot_problem(st.bootenv, booted.slot, dev.backend, st.floor)
        if problem is not None:
            return f"the bootloader's check: {problem}"
        slot_file = dev.paths.slots / f"{booted.slot.lower()}.img"
        digest = sha256_prefix(slot_file, image.length)
        if (digest, image.length) != (want.sha256, want.length) or booted.sha256 != digest:
            return (
                f"slot {booted.slot} holds {digest[:12]} ({image.length} bytes), "
                f"booted {booted.sha256[:12]}, published {want.version} is {want.sha256[:12]}"
            )
        if booted.version != want.version or image.version != want.version:
            return f"runs {booted.version}, not the round's release {want.version}"
        if st.install.phase is not Phase.IDLE:
            return f"install left in phase {st.install.phase.value}"
        floor = (st.floor.version, st.floor.security_counter)
        before = self.floors[name]
        if floor < before:
            return f"the floor went down from {before} to {floor}"
        if st.floor.version != Version.parse(want.version):
            return f"floor {st.floor.version} after committing {want.version}"
        self.floors[name] = floor
        if any(dev.paths.staging.iterdir()):
            return "a staged image was left behind"
        return None

    def _check_repository(self) -> str | None:
        with self._audit_lock:
            result = self.audit.check()
        latest = self.repo.repo.latest_version("targets")
        if result.targets != latest:
            return f"the server serves targets {result.targets}, the repository is at {latest}"
        return None

    def audit_all(self, report: SoakReport) -> None:
        """The end: the chain from the offline root, and every served blob."""
        with self._audit_lock:
            result = self.audit.check()
            report.audits = self.audit.checks
            report.blobs_checked = self.audit.check_blobs(result)
        if result.targets != self.repo.repo.latest_version("targets"):
            report.failures.append(f"the server serves targets {result.targets} at the end")


def _agent(device_dir: Path, action: str) -> subprocess.Popen[bytes]:
    """``otaguard agent DIR ACTION`` in a process group of its own (its health check
    child dies with it, as everything does in a power cut)."""
    with _FORK_LOCK:
        return subprocess.Popen(
            [sys.executable, "-m", "otaguard", "agent", str(device_dir), action],
            env=agent_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _wait_install_start(proc: subprocess.Popen[bytes], state: Path, mark: int) -> None:
    """Until the agent persists its install's first step (its state file changes from
    ``mark``), or exits."""
    deadline = time.monotonic() + AGENT_TIMEOUT_S
    while proc.poll() is None and _mtime(state) == mark and time.monotonic() < deadline:
        time.sleep(STATE_POLL_S)


def _power_cut(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent's process group and wait until every process of it is gone (a
    child caught between fork and exec still holds the device lock until it dies)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + AGENT_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(STATE_POLL_S)


def _wait(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Wait up to ``seconds``; whether the process exited by then."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def _cut_at(dev: Device, version: str) -> str:
    """Where the install stood right after the cut (its persisted phase)."""
    state = InstallState.load(dev.paths.install_state)
    if state.phase is Phase.IDLE:
        booted = dev.status().booted
        return "committed" if booted is not None and booted.version == version else "not-started"
    if state.phase is Phase.SELECTED and state.written > 0:
        return "streaming"
    return state.phase.value


def _plan(settings: SoakSettings) -> list[_Plan]:
    """Which device each run uses, which are server kills, where each cut falls."""
    rng = random.Random(settings.seed)  # noqa: S311 - a reproducible test plan
    kills = settings.runs // settings.server_kill_one_in
    server_runs = set(rng.sample(range(settings.runs), kills))
    return [
        _Plan(
            index=i,
            device=i % settings.devices,
            server_kill=i in server_runs,
            in_install=rng.randrange(FROM_START_ONE_IN) > 0,
            at=rng.random(),
        )
        for i in range(settings.runs)
    ]


def run_soak(settings: SoakSettings, *, progress: ProgressFn | None = None) -> SoakReport:
    """Run the soak in ``settings.work_dir`` (new or empty; left for inspection).

    Raises:
        OperatorError: the work directory is not empty.
        OtaguardError: the soak's world could not be set up (a run's failure is counted,
            never raised).
    """
    t0 = time.monotonic()
    work = settings.work_dir
    if work.exists() and any(work.iterdir()):
        raise OperatorError(f"{work} is not empty: give the soak a new or empty directory")
    work.mkdir(parents=True, exist_ok=True)
    repo, data_dir = SoakRepository.create(
        work, image_size=settings.image_bytes, seed=settings.seed
    )
    repo.publish(_version(0))
    server = ServerProcess(
        data_dir=data_dir, repo_dir=repo.repo.dir, port=free_port(), log_path=work / "server.log"
    )
    server.start()
    soak = _Soak(settings, server, repo)
    report = SoakReport(planned=settings.runs)
    try:
        soak.audit.wait_targets(repo.repo.latest_version("targets"))
        for i in range(settings.devices):
            dev = soak.provision(f"soak-{i:02d}", _version(0))
            soak.devices.append(dev)
            st = dev.status()
            soak.floors[dev.config.serial] = (st.floor.version, st.floor.security_counter)
        plans = _plan(settings)
        with ThreadPoolExecutor(max_workers=settings.workers) as pool:
            for r, start in enumerate(range(0, len(plans), settings.devices), start=1):
                version = _version(r)
                try:
                    soak.publish(version)
                except OtaguardError as e:  # the server no longer serves what is published
                    report.failures.append(f"release {version}: {error_line(e)}")
                    break
                report.releases = r + 1
                if r == 1:
                    soak.calibrate(version)
                batch = plans[start : start + settings.devices]
                for run in pool.map(lambda p, v=version: soak.run(p, v), batch):
                    report.add(run)
                report.elapsed = time.monotonic() - t0
                report.audits = soak.audit.checks
                if progress is not None:
                    progress(report)
        soak.audit_all(report)
    finally:
        soak.audit.close()
        server.stop()
    report.elapsed = time.monotonic() - t0
    return report


def _version(n: int) -> str:
    """The ``n``-th release: 1.0.0, 1.1.0, ... (each above the last: floors only rise)."""
    return f"1.{n}.0"
