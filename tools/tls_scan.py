"""``make scan``: sslyze against a freshly started update server, Mozilla's profiles.

Starts ``otaguard server`` on a free loopback port with a new data directory, scans it
with sslyze (installed in its own virtual environment: sslyze pins an older
`cryptography` than otaguard), prints sslyze's report and the Mozilla profile the server
meets, and exits non-zero unless it meets "modern". A client certificate is presented when
one is given (``--cert/--key``), so the scan also covers a mutual-TLS device API.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROFILES = ("modern", "intermediate", "old")
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not start listening in time")


def scan(
    sslyze: str, port: int, ca: Path, profile: str, extra: list[str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sslyze, "-m", "sslyze", f"--mozilla_config={profile}", f"--certinfo_ca_file={ca}",
         *extra, f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sslyze-python", required=True, help="python of the sslyze venv")
    p.add_argument("--cert", type=Path, help="client certificate to present (PEM)")
    p.add_argument("--key", type=Path, help="its private key (PEM)")
    a = p.parse_args()
    extra = ["--cert", str(a.cert), "--key", str(a.key)] if a.cert and a.key else []
    with tempfile.TemporaryDirectory(prefix="otaguard-scan-") as work:
        data, port = Path(work) / "srv", free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
        server = subprocess.Popen(
            [sys.executable, "-m", "otaguard", "server", "--data", str(data), "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_listening(port, server)
            met = None
            for profile in PROFILES:
                result = scan(a.sslyze_python, port, data / "ca" / "ca.pem", profile, extra)
                if profile == "modern":
                    print(result.stdout)
                if result.returncode == 0 and "FAILED - Not compliant" not in result.stdout:
                    met = profile
                    break
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"SUMMARY tls_scan: Mozilla profile met: {met or 'none'}")
    return 0 if met == "modern" else 1


if __name__ == "__main__":
    sys.exit(main())
