"""Peak memory and time of a real agent update of a 64 MiB, 256 MiB and 1 GiB image.

Builds a signed repository with a small 1.0.0 image and one release per size (each for
its own hardware id, so each device is offered exactly one), serves it with the real
HTTPS server (in a thread of this process), provisions and enrolls a device per size at
1.0.0 and runs ``python -m otaguard -v agent DEVICE update`` as a separate process. The
agent's peak RSS comes from ``os.wait4`` on that one child (``ru_maxrss``, KiB on
Linux) through a bare wrapper, so nothing else this process ran or waited for is counted.

While the agent runs, a sampler thread watches ``/proc/PID`` (peak ``VmHWM``) and the
device directory (slot B as the image streams into it, and the staging directory, which
must never hold more than the SBOM), and a reader thread timestamps the agent's
``install step ...`` log lines; together they split the update into its phases.

Target: peak RSS <= 64 MiB at every size, and each device runs its new release
afterwards. Exit 0 when all hold, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from install_throughput import start_server, stop

from otaguard.agent import Device
from otaguard.agent.slots import FileSlots
from otaguard.crypto import read_public_key
from otaguard.model import Unsafe
from otaguard.repo import ImageRepository, Release
from otaguard.server import init_data_dir
from otaguard.server.client import FleetClient
from otaguard.sim import SIM_HEALTH_COMMAND, make_image
from otaguard.sim.sbom import make_sbom

MIB: Final = 1024 * 1024
SIZES: Final = (64 * MIB, 256 * MIB, 1024 * MIB)
FACTORY_BYTES: Final = 4 * MIB
HW: Final = "bench-hw"
TARGET_RSS_MIB: Final = 64.0
SAMPLE_S: Final = 0.01
AGENT_TIMEOUT_S: Final = 600.0


@dataclass
class Timeline:
    """Monotonic times of what the agent was seen doing (relative to its start)."""

    start: float
    events: dict[str, float] = field(default_factory=dict)
    hwm_kib: int = 0
    staging_peak: int = 0
    log: list[str] = field(default_factory=list)

    def mark(self, name: str) -> None:
        """Record the first time ``name`` happened."""
        self.events.setdefault(name, time.monotonic() - self.start)


def _sbom(image: Path) -> Path:
    """Every release needs a CycloneDX SBOM: a small valid one beside the image."""
    return make_sbom(Path(f"{image}.cdx.json"), name="firmware", version=image.stem)


def _read_stderr(stream: IO[str], tl: Timeline) -> None:
    for line in stream:
        tl.log.append(line.rstrip())
        if "install step " in line:
            step = line.split("install step ", 1)[1].split()[0]
            tl.mark(f"step {step}")
        elif "booted slot" in line:
            tl.mark("booted new slot")


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _staging_bytes(staging: Path) -> int:
    try:
        return sum(p.stat().st_size for p in staging.iterdir() if p.is_file())
    except OSError:
        return 0


def _sample(pid: int, device: Path, size: int, tl: Timeline, done: threading.Event) -> None:
    staging = device / "staging"
    slot_b = FileSlots(device / "slots").path("B")
    while not done.is_set():
        with contextlib.suppress(OSError, ValueError):  # the process is exiting
            tl.hwm_kib = max(tl.hwm_kib, _vm_hwm_kib(pid))
        tl.staging_peak = max(tl.staging_peak, _staging_bytes(staging))
        if slot_b.exists() and "step stream_to_slot" in tl.events:
            written = slot_b.stat().st_size
            if written > 0:
                tl.mark("slot B receiving")
            if written >= size:
                tl.mark("slot B complete")
        done.wait(SAMPLE_S)


# Runs the agent and reports its rusage. Needed because on Linux a child's ru_maxrss
# also counts the RSS of the process it was forked (or vforked) from, up to its exec:
# measured directly, the agent would inherit this benchmark process's size (server,
# repository, tuf). This wrapper is a bare interpreter (~10 MiB), well below the agent.
WRAPPER: Final = """
import json, os, sys
result, pidfile, *argv = sys.argv[1:]
pid = os.posix_spawn(argv[0], argv, os.environ)
with open(pidfile + ".tmp", "w") as f:
    f.write(str(pid))
os.replace(pidfile + ".tmp", pidfile)
_, status, ru = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(result, "w") as f:
    json.dump({"code": code, "maxrss_kib": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime}, f)
sys.exit(0 if code == 0 else 1)
"""


@dataclass
class AgentRun:
    """What one agent process did."""

    code: int
    maxrss_kib: int
    wall_s: float
    cpu_s: float
    timeline: Timeline


def _agent_pid(pidfile: Path, wrapper: subprocess.Popen[str]) -> int | None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and wrapper.poll() is None:
        try:
            return int(pidfile.read_text())
        except (OSError, ValueError):
            time.sleep(0.001)
    return None


def run_agent(device: Path, size: int, work: Path) -> AgentRun:
    """Run ``otaguard agent DEVICE update`` under the wrapper and watch it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    result, pidfile = work / "agent-rusage.json", work / "agent.pid"
    argv = [sys.executable, "-m", "otaguard", "-v", "agent", str(device), "update"]
    with open(work / "agent.out", "w") as out:
        start = time.monotonic()
        wrapper = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(result), str(pidfile), *argv],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        tl = Timeline(start)
        assert wrapper.stderr is not None
        reader = threading.Thread(target=_read_stderr, args=(wrapper.stderr, tl), daemon=True)
        reader.start()
        done = threading.Event()
        pid = _agent_pid(pidfile, wrapper)
        sampler = None
        if pid is not None:
            sampler = threading.Thread(
                target=_sample, args=(pid, device, size, tl, done), daemon=True
            )
            sampler.start()
        try:
            wrapper.wait(AGENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            if pid is not None:
                os.kill(pid, 9)
            wrapper.wait()
        wall = time.monotonic() - start
        done.set()
        if sampler is not None:
            sampler.join()
        reader.join(10)
        wrapper.stderr.close()
    try:
        res = json.loads(result.read_text())
    except (OSError, ValueError):
        res = {"code": -1, "maxrss_kib": 0, "cpu_s": 0.0}
    return AgentRun(res["code"], res["maxrss_kib"], wall, res["cpu_s"], tl)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="otaguard-bench-rss-"))
    try:
        return run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path) -> int:
    t0 = time.perf_counter()
    v100 = make_image(work / "fw-1.0.0.img", size=FACTORY_BYTES, seed="1.0.0")
    paths = init_data_dir(work / "server")
    repo = ImageRepository.init(
        work / "repo",
        keys_dir=work / "keys",
        passphrases=lambda _name: b"bench passphrase",
        online_key=read_public_key(paths.online_public_key),
    )
    hws = {size: f"{HW}-{size // MIB}" for size in SIZES}
    repo.add_release(
        v100,
        sbom=_sbom(v100),
        version="1.0.0",
        hardware_ids=list(hws.values()),
        security=False,
        security_counter=None,
    )
    rels = {}
    for size in SIZES:
        image = make_image(work / f"fw-{size // MIB}.img", size=size, seed=str(size))
        rels[size] = repo.add_release(
            image,
            sbom=_sbom(image),
            version=f"1.{size // MIB}.0",
            hardware_ids=[hws[size]],
            security=False,
            security_counter=None,
        )
        image.unlink()  # the repository holds its copy
    print(f"setup: repository with 1.0.0 and {len(SIZES)} releases in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip

    # The server in a process of its own, as install_throughput.py runs it: the 1 GiB
    # release takes longer to load than an in-thread start waits for.
    token = paths.operator_token.read_text().strip()
    server, url = start_server(
        paths.data_dir, repo.dir, work / "server.log", ca=paths.ca_cert, token=token
    )
    ok = True
    try:
        for size in SIZES:
            device_dir = work / f"device-{size // MIB}"
            Device.provision(
                device_dir,
                server_url=url,
                root_json=repo.metadata_dir / "root.json",
                ca_pem=paths.ca_cert,
                hardware_id=hws[size],
                factory_image=v100,
                factory_version="1.0.0",
                health_command=SIM_HEALTH_COMMAND,
                serial=f"bench-{size // MIB}",
            )
            # Mutual TLS: register and enroll the device as the factory would.
            with FleetClient(server_url=url, ca_cert=paths.ca_cert, token=token) as fleet:
                enrollment = fleet.add_device(f"bench-{size // MIB}", hws[size]).token
            Device(device_dir).enroll(enrollment, key_store=Unsafe.FILE_DEVICE_KEY)
            agent = run_agent(device_dir, size, work)
            ok = _report(device_dir, size, rels[size], agent, work) and ok
            shutil.rmtree(device_dir, ignore_errors=True)
    finally:
        stop(server)
    sizes = ", ".join(f"{s // MIB} MiB" for s in SIZES)
    print(f"SUMMARY agent_rss: {'PASS' if ok else 'FAIL'} (peak RSS target <= "
          f"{TARGET_RSS_MIB:.0f} MiB at {sizes})")  # fmt: skip
    return 0 if ok else 1


def _report(device_dir: Path, size: int, rel: Release, agent: AgentRun, work: Path) -> bool:
    """Print one size's figures; whether it updated within the RSS target."""
    code, tl, wall = agent.code, agent.timeline, agent.wall_s
    status = Device(device_dir).status()
    running = status.booted.version if status.booted else None
    outcome = (status.install.last_result or {}).get("outcome")
    slot_ok = FileSlots(device_dir / "slots").digest("B", rel.length) == rel.sha256
    updated = code == 0 and running == str(rel.info.version) and outcome == "updated" and slot_ok
    if not updated:
        print(f"agent exited {code}, running {running}, outcome {outcome}, slot B ok {slot_ok}")
        print((work / "agent.out").read_text(errors="replace")[-2000:])
        print("\n".join(tl.log[-20:]))
    peak_mib = agent.maxrss_kib / 1024
    mib = size / MIB
    print(
        f"\n{mib:.0f} MiB: agent update 1.0.0 -> {rel.info.version}: exit {code}, outcome {outcome}"
    )
    print(
        f"  peak RSS of the agent: {peak_mib:.1f} MiB (wait4 ru_maxrss via wrapper); "
        f"/proc VmHWM, last sample: {tl.hwm_kib / 1024:.1f} MiB; staging peak "
        f"{tl.staging_peak / 1024:.0f} KiB (the SBOM only)"
    )
    print(f"  time: {wall:.2f} s wall, {agent.cpu_s:.2f} s agent CPU; "
          f"{mib / wall:.0f} MiB/s end to end (process start included)")  # fmt: skip
    prev = 0.0
    for name, at in sorted(tl.events.items(), key=lambda kv: kv[1]):
        print(f"  {at:7.2f}  (+{at - prev:5.2f})  {name}")
        prev = at
    print(f"  {wall:7.2f}  (+{wall - prev:5.2f})  agent exited")
    ok = updated and peak_mib <= TARGET_RSS_MIB and tl.staging_peak < MIB
    print(f"  {'PASS' if ok else 'FAIL'} {mib:.0f} MiB peak_rss={peak_mib:.1f} MiB")
    return ok


if __name__ == "__main__":
    sys.exit(main())
