"""Streaming install: throughput, peak RSS and disk growth of a real agent update,
against ``openssl dgst -sha256`` and RAUC installing the same payload in the same run.

Setup: a signed repository with a 4 MiB factory release and one release per size (64 MiB,
256 MiB, 1 GiB; each for its own hardware id, so each device is offered exactly one),
served by the real HTTPS server in its own process. Each device is provisioned and
enrolled (mutual TLS), then a worker process that has already imported otaguard (an
agent daemon is a running process, as RAUC's service is) runs ``Device.update()``: check
in, metadata refresh, the SBOM, the image streamed over loopback TLS into slot B, the
simulated reboot (which hashes the slot), the health check (``true``) and the commit.
The worker's peak RSS comes from ``os.wait4`` on it (``ru_maxrss``); a sampler thread
watches the device directory's allocated size (its peak and final growth).

References, same image file, same run:

* ``openssl dgst -sha256 IMAGE`` (one hash pass over the page-cached file);
* RAUC (Debian ``rauc`` 1.8): ``rauc service`` on a private session D-Bus with
  ``bootloader=noop`` and two file-backed ``type=raw`` slots, a ``format=plain`` bundle
  signed for its keyring (built before the clock starts), and ``rauc install BUNDLE``
  timed; it verifies the bundle's signature and copies the image into the inactive slot.

Targets: >= 160 MiB/s at 256 MiB, not slower than RAUC at 64 and 256 MiB, peak RSS <= 64
MiB at every size, the device directory growing by the image size only (also at its
peak: no staging copy). Exit 0 when all hold, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from otaguard.agent import Device
from otaguard.agent.slots import FileSlots
from otaguard.crypto import read_public_key
from otaguard.model import Unsafe
from otaguard.repo import ImageRepository
from otaguard.server import init_data_dir
from otaguard.server.client import FleetClient
from otaguard.sim import make_image
from otaguard.sim.sbom import make_sbom

MIB: Final = 1024 * 1024
THROUGHPUT_SIZES = (64 * MIB, 256 * MIB)
RSS_SIZES = (64 * MIB, 256 * MIB, 1024 * MIB)
FACTORY_BYTES: Final = 4 * MIB
TARGET_MIB_S: Final = 160.0
TARGET_RSS_MIB: Final = 64.0
#: the device directory may grow by the image plus this (metadata, state, SBOM, logs)
DISK_SLACK: Final = 2 * MIB
SAMPLE_S: Final = 0.02
AGENT_TIMEOUT_S: Final = 900.0
STARTUP_TIMEOUT_S: Final = 300.0  # a loaded machine loading a 1 GiB release
PASSPHRASE: Final = b"bench passphrase"

# The agent as a daemon would run it: imports done before the clock starts. It prints
# "ready", waits for a line on stdin, times Device.update() and writes the result. The
# wrapper around it reports its rusage (ru_maxrss of the worker alone: measured
# directly, a child's maxrss would include this benchmark process it was forked from).
WORKER: Final = """
import json, sys, time
from otaguard.agent import Device
result, device = sys.argv[1:]
marks = []
def mark(action):
    marks.append((action.name, time.perf_counter() - t0))
print("ready", flush=True)
sys.stdin.readline()
t0, c0 = time.perf_counter(), time.process_time()
res = Device(device, after_action=mark).update()
secs, cpu = time.perf_counter() - t0, time.process_time() - c0
with open(result, "w") as f:
    json.dump({"seconds": secs, "cpu": cpu, "outcome": res.outcome, "to": res.to_version,
               "marks": marks}, f)
"""
WRAPPER: Final = """
import json, os, sys
out, *argv = sys.argv[1:]
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kib": ru.ru_maxrss}, f)
"""


def hw(size: int) -> str:
    return f"bench-{size // MIB}m"


def allocated(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (sparse files count what they use)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue  # a temp file renamed or removed meanwhile
    return total


@dataclass
class Install:
    size: int
    seconds: float
    maxrss_kib: int
    #: seconds from the start of the update until the new slot was armed (the point where
    #: RAUC's install ends: image written, verified and marked bootable)
    armed: float
    #: (action, seconds since start) after each install action
    marks: list[tuple[str, float]]
    disk_growth: int
    disk_peak_growth: int
    ok: bool
    detail: str
    #: CPU seconds of the agent process during the update (all its threads): on a loaded
    #: machine the figure that does not depend on what else runs
    cpu: float = 0.0

    @property
    def rate_seconds(self) -> float:
        """Seconds for ratios: a failed run counts as infinitely slow."""
        return self.seconds if self.ok and self.seconds > 0 else float("inf")

    @property
    def armed_seconds(self) -> float:
        """Seconds to armed for ratios (a failed run counts as infinitely slow)."""
        return self.armed if self.ok and self.armed > 0 else float("inf")

    @property
    def mib_s(self) -> float:
        return self.size / MIB / self.seconds if self.seconds > 0 else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    data: Path, repo: Path, log: Path, *, ca: Path, token: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    args = [sys.executable, "-m", "otaguard", "server", "--data", str(data)]
    args += ["--repo", str(repo), "--port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: see {log}")
        try:
            req = urllib.request.Request(  # noqa: S310 - https to the bench's own server
                url + "/metadata/timestamp.json", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:  # noqa: S310
                if resp.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    stop(proc)  # never leave it running behind the benchmark
    raise SystemExit(f"{url} did not come up in {STARTUP_TIMEOUT_S:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_install(device: Path, size: int, work: Path) -> Install:
    """Run one update in a warmed-up worker; sample the device directory meanwhile."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    result, rusage = work / f"result-{size}.json", work / f"rusage-{size}.json"
    before = allocated(device)
    peak = before
    argv = [sys.executable, "-c", WORKER, str(result), str(device)]
    with open(work / f"agent-{size}.log", "w") as log:
        wrapper = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(rusage), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        assert wrapper.stdin is not None
        assert wrapper.stdout is not None
        if wrapper.stdout.readline().strip() != "ready":
            wrapper.wait()
            return Install(size, 0, 0, 0, [], 0, 0, False, f"worker did not start: see {log.name}")
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(SAMPLE_S):
                peak = max(peak, allocated(device))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wrapper.stdin.write("go\n")
        wrapper.stdin.flush()
        try:
            wrapper.wait(AGENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            wrapper.kill()
            wrapper.wait()
        done.set()
        sampler.join()
    after = allocated(device)
    peak = max(peak, after)
    try:
        res = json.loads(result.read_text())
        ru = json.loads(rusage.read_text())
    except (OSError, ValueError):
        tail = (work / f"agent-{size}.log").read_text(errors="replace")[-1500:]
        return Install(
            size, 0, 0, 0, [], after - before, peak - before, False, f"no result:\n{tail}"
        )
    status = Device(device).status()
    image = status.bootenv.slots.get("B")
    slot_ok = image is not None and FileSlots(device / "slots").digest("B", size) == image.sha256
    ok = ru["code"] == 0 and res["outcome"] == "updated" and slot_ok
    detail = f"outcome {res['outcome']}, slot B verified {slot_ok}"
    marks = [(str(n), float(t)) for n, t in res["marks"]]
    armed = next((t for n, t in marks if n == "arm"), 0.0)
    return Install(
        size,
        res["seconds"],
        ru["maxrss_kib"],
        armed,
        marks,
        after - before,
        peak - before,
        ok,
        detail,
        float(res.get("cpu", 0.0)),
    )


def report_install(r: Install, server_cpu: float) -> None:
    """Print one install's figures (time, memory, disk, CPU, the actions' times)."""
    size = r.size
    print(
        f"otaguard {size // MIB:5d} MiB: {r.seconds:6.2f} s = {r.mib_s:6.0f} MiB/s, "
        f"peak RSS {r.maxrss_kib / 1024:5.1f} MiB, disk +{r.disk_growth / MIB:.1f} MiB "
        f"(peak +{r.disk_peak_growth / MIB:.1f} MiB), {r.detail}"
    )
    print(
        f"  CPU: agent {r.cpu:.2f} s ({size / MIB / max(r.cpu, 1e-9):.0f} MiB per "
        f"CPU-second), server {server_cpu:.2f} s; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    steps = ", ".join(f"{n} {t:.2f}" for n, t in r.marks)
    print(f"  armed after {r.armed:.2f} s; s since start after each action: {steps}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- references ---------------------------------------------------------------------------
def download_seconds(device: Path, repo: Path, size: int) -> float:
    """The same blob fetched over the same mutual TLS and thrown away: the ceiling the
    server and the transport set (in this process, through the agent's fetcher)."""
    blob = next(
        p.name for p in (repo / "targets").iterdir() if p.name.endswith(f"-1.{size // MIB}.0.img")
    )
    dev = Device(device)
    fetcher = dev.checked_in_fetcher()  # the agent's own seam: check-in, then mutual TLS
    try:
        url = f"{dev.config.server_url}/targets/{blob}"
        t0 = time.perf_counter()
        n = sum(len(c) for c in fetcher.stream_range(url, start=0, max_length=size))
        secs = time.perf_counter() - t0
    finally:
        fetcher.close()
    if n != size:
        raise SystemExit(f"download reference got {n} of {size} bytes")
    return secs


def openssl_seconds(image: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["openssl", "dgst", "-sha256", str(image)], check=True, capture_output=True)
    return time.perf_counter() - t0


class Rauc:
    """``rauc service`` on a private session bus with two file-backed raw slots."""

    def __init__(self, work: Path, slot_bytes: int) -> None:
        self.dir = work / "rauc"
        self.dir.mkdir()
        d = self.dir
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(d / "key.pem"),
                "-out",
                str(d / "cert.pem"),
                "-days",
                "2",
                "-subj",
                "/O=otaguard-bench/CN=rauc",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,digitalSignature,keyCertSign",
            ],
            check=True,
            capture_output=True,
        )
        for slot in ("a", "b"):
            with open(d / f"slot-{slot}.img", "wb") as f:
                f.truncate(slot_bytes)
        (d / "data").mkdir()
        (d / "mnt").mkdir()
        (d / "system.conf").write_text(
            "[system]\ncompatible=otaguard-bench\nbootloader=noop\n"
            f"data-directory={d / 'data'}\nbundle-formats=plain\n"
            f"[keyring]\npath={d / 'cert.pem'}\n"
            f"[slot.rootfs.0]\ndevice={d / 'slot-a.img'}\ntype=raw\nbootname=A\n"
            f"[slot.rootfs.1]\ndevice={d / 'slot-b.img'}\ntype=raw\nbootname=B\n"
        )
        bus = d / "bus"
        self.dbus = subprocess.Popen(
            [
                "dbus-daemon",
                "--session",
                f"--address=unix:path={bus}",
                "--nofork",
                "--print-address=1",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.dbus.stdout is not None
        address = self.dbus.stdout.readline().strip()
        self.env = {
            **os.environ,
            "DBUS_SESSION_BUS_ADDRESS": address,
            "DBUS_STARTER_BUS_TYPE": "session",
        }
        self.service = subprocess.Popen(
            [
                "rauc",
                "service",
                f"--conf={d / 'system.conf'}",
                f"--mount={d / 'mnt'}",
                "--override-boot-slot=A",
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(d / "service.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            st = subprocess.run(["rauc", "status"], env=self.env, capture_output=True, check=False)
            if st.returncode == 0:
                return
            time.sleep(0.2)
        raise SystemExit(f"rauc service did not come up: see {d / 'service.log'}")

    def bundle(self, image: Path, version: str) -> Path:
        content = self.dir / f"content-{version}"
        content.mkdir()
        os.link(image, content / "rootfs.img")
        (content / "manifest.raucm").write_text(
            f"[update]\ncompatible=otaguard-bench\nversion={version}\n"
            "[bundle]\nformat=plain\n[image.rootfs]\nfilename=rootfs.img\n"
        )
        out = self.dir / f"bundle-{version}.raucb"
        subprocess.run(
            [
                "rauc",
                "bundle",
                f"--cert={self.dir / 'cert.pem'}",
                f"--key={self.dir / 'key.pem'}",
                str(content),
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        shutil.rmtree(content)
        return out

    def install_seconds(self, bundle: Path, image: Path) -> float:
        t0 = time.perf_counter()
        subprocess.run(
            ["rauc", "install", str(bundle)], env=self.env, check=True, capture_output=True
        )
        secs = time.perf_counter() - t0
        # --override-boot-slot=A: every install goes to slot B.
        with open(self.dir / "slot-b.img", "rb") as a, open(image, "rb") as b:
            size = image.stat().st_size
            while size > 0:
                n = min(MIB, size)
                if a.read(n) != b.read(n):
                    raise SystemExit("RAUC's slot B does not hold the image")
                size -= n
        return secs

    def close(self) -> None:
        for p in (self.service, self.dbus):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- the run ------------------------------------------------------------------------------
def main() -> int:
    global THROUGHPUT_SIZES, RSS_SIZES  # --quick narrows the run
    if "--quick" in sys.argv[1:]:  # a trial of the set-up: 64 MiB only, no verdict
        THROUGHPUT_SIZES, RSS_SIZES = (64 * MIB,), (64 * MIB,)
    for tool in ("openssl", "rauc", "dbus-daemon", "mksquashfs"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (make sysdeps)")
            return 1
    work = Path(tempfile.mkdtemp(prefix="otaguard-bench-install-"))
    code = 1
    try:
        code = run(work)
    finally:
        if code == 0:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} for inspection (agent-*.log, server.log, rauc/)")
    return code


def run(work: Path) -> int:
    t0 = time.perf_counter()
    sizes = sorted(set(THROUGHPUT_SIZES) | set(RSS_SIZES))
    paths = init_data_dir(work / "server")
    repo = ImageRepository.init(
        work / "repo",
        keys_dir=work / "keys",
        passphrases=lambda _name: PASSPHRASE,
        online_key=read_public_key(paths.online_public_key),
    )
    factory = make_image(work / "fw-1.0.0.img", size=FACTORY_BYTES, seed="1.0.0")
    # The factory image must be listed: the server quarantines a device that reports
    # booting an image the repository does not list.
    repo.add_release(
        factory,
        sbom=make_sbom(Path(f"{factory}.cdx.json"), name="fw", version="1.0.0"),
        version="1.0.0",
        hardware_ids=[hw(s) for s in sizes],
        security=False,
        security_counter=None,
    )
    images: dict[int, Path] = {}
    for size in sizes:
        version = f"1.{size // MIB}.0"
        images[size] = make_image(work / f"fw-{version}.img", size=size, seed=version)
        repo.add_release(
            images[size],
            sbom=make_sbom(Path(f"{images[size]}.cdx.json"), name="fw", version=version),
            version=version,
            hardware_ids=[hw(size)],
            security=False,
            security_counter=None,
        )
    print(f"setup: repository with {len(sizes)} releases in {time.perf_counter() - t0:.1f} s")
    token = paths.operator_token.read_text().strip()
    server, url = start_server(
        paths.data_dir, repo.dir, work / "server.log", ca=paths.ca_cert, token=token
    )
    rauc = Rauc(work, max(THROUGHPUT_SIZES) + MIB)
    bundles = {s: rauc.bundle(images[s], f"1.{s // MIB}.0") for s in THROUGHPUT_SIZES}
    results: dict[int, Install] = {}
    refs: dict[int, tuple[float, float]] = {}
    try:
        for size in sizes:
            device = work / f"device-{size // MIB}m"
            Device.provision(
                device,
                server_url=url,
                root_json=repo.metadata_dir / "root.json",
                ca_pem=paths.ca_cert,
                hardware_id=hw(size),
                factory_image=factory,
                factory_version="1.0.0",
                health_command=["true"],
                serial=f"bench-{size // MIB}m",
            )
            with FleetClient(server_url=url, ca_cert=paths.ca_cert, token=token) as fleet:
                enrollment = fleet.add_device(f"bench-{size // MIB}m", hw(size)).token
            Device(device).enroll(enrollment, key_store=Unsafe.FILE_DEVICE_KEY)
            # The references right beside the install, so they see the same machine load.
            if size in THROUGHPUT_SIZES:
                ossl = openssl_seconds(images[size])
            server_cpu = cpu_seconds(server.pid)
            results[size] = r = run_install(device, size, work)
            server_cpu = cpu_seconds(server.pid) - server_cpu
            report_install(r, server_cpu)
            if size in THROUGHPUT_SIZES:
                rauc_s = rauc.install_seconds(bundles[size], images[size])
                refs[size] = (ossl, rauc_s)
                dl = download_seconds(device, repo.dir, size)
                print(
                    f"  reference: openssl dgst -sha256 {ossl:.2f} s = "
                    f"{size / MIB / ossl:.0f} MiB/s; rauc install {rauc_s:.2f} s = "
                    f"{size / MIB / rauc_s:.0f} MiB/s; the blob downloaded and discarded "
                    f"{dl:.2f} s = {size / MIB / dl:.0f} MiB/s (server + TLS ceiling)"
                )
    finally:
        stop(server)
        rauc.close()

    ok = all(r.ok for r in results.values())
    lines = []
    for size in THROUGHPUT_SIZES:
        r, (ossl, rauc_s) = results[size], refs[size]
        lines.append(
            f"{size // MIB} MiB: {r.mib_s:.0f} MiB/s = {ossl / r.rate_seconds:.2f}x openssl, "
            f"to armed {size / MIB / r.armed_seconds:.0f} MiB/s = "
            f"{rauc_s / r.armed_seconds:.2f}x rauc install"
        )
        ok &= r.armed_seconds <= rauc_s
    ok &= all(results[s].mib_s >= TARGET_MIB_S for s in THROUGHPUT_SIZES if s >= 256 * MIB)
    for size in RSS_SIZES:
        r = results[size]
        ok &= r.maxrss_kib / 1024 <= TARGET_RSS_MIB
        ok &= r.disk_peak_growth <= size + DISK_SLACK and r.disk_growth <= size + DISK_SLACK
    rss = ", ".join(f"{s // MIB} MiB: {results[s].maxrss_kib / 1024:.1f}" for s in RSS_SIZES)
    disk = ", ".join(f"{s // MIB} MiB: +{results[s].disk_peak_growth / MIB:.1f}" for s in RSS_SIZES)
    print(
        f"SUMMARY install_throughput: {'PASS' if ok else 'FAIL'} {'; '.join(lines)} "
        f"(targets >= {TARGET_MIB_S:.0f} MiB/s at 256 MiB, >= 1.00x rauc); "
        f"peak RSS MiB {rss} (target <= {TARGET_RSS_MIB:.0f}); "
        f"disk peak growth MiB {disk} (target: the image + {DISK_SLACK // MIB} MiB)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
