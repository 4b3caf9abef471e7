"""``make scan``: sslyze against a freshly started update server, Mozilla's profiles.

Starts ``otaguard server`` on a free loopback port with a new data directory, registers a
scan device through the operator API and enrolls it (EST simpleenroll with its token, a new
P-256 key), checks that the device API accepts its certificate, then scans the server with
sslyze presenting that client certificate (installed in its own virtual environment:
sslyze pins an older `cryptography` than otaguard). Prints sslyze's report and the Mozilla
profile the server meets, and exits non-zero unless it meets "modern". ``--cert/--key``
present another client certificate instead.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from otaguard.agent.identity import EST_ENROLL_PATH, build_csr
from otaguard.server.client import FleetClient

PROFILES = ("modern", "intermediate", "old")
SCAN_SERIAL = "tls-scan"
SCAN_HARDWARE_ID = "tls-scan"
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


def _https(
    port: int, ca: Path, cert: Path | None = None, key: Path | None = None
) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)


def enroll_scan_device(data: Path, port: int, work: Path) -> tuple[Path, Path]:
    """Register and enroll a device as a real one would; return its certificate and key."""
    ca = data / "ca" / "ca.pem"
    operator = (data / "operator-token").read_text().strip()
    with FleetClient(server_url=f"https://127.0.0.1:{port}", ca_cert=ca, token=operator) as fleet:
        token = fleet.add_device(SCAN_SERIAL, SCAN_HARDWARE_ID).token
    key = ec.generate_private_key(ec.SECP256R1())
    auth = base64.b64encode(f"{SCAN_SERIAL}:{token}".encode()).decode()
    conn = _https(port, ca)
    try:
        conn.request(
            "POST", EST_ENROLL_PATH, body=base64.encodebytes(build_csr(key, SCAN_SERIAL)),
            headers={"Content-Type": "application/pkcs10", "Authorization": f"Basic {auth}"},
        )  # fmt: skip
        resp = conn.getresponse()
        answer = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise SystemExit(f"enrolling the scan device failed: HTTP {resp.status} {answer[:200]!r}")
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(answer.split())))
    cert_path, key_path = work / "scan-device.pem", work / "scan-device.key"
    # The leaf alone (the one for our key; a PKCS#7 SET has no order): the server trusts
    # the issuing CA already, and sslyze's legacy OpenSSL (its SSL 2.0 probe) cannot load
    # this chain file.
    leaf = next(c for c in certs if c.public_key() == key.public_key())
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    # The device API takes it: the scan covers what devices see.
    conn = _https(port, ca, cert_path, key_path)
    try:
        conn.request("GET", "/api/v1/device/whoami")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise SystemExit(
            f"the device API refused the scan device: HTTP {resp.status} {body[:200]!r}"
        )
    print(
        f"scan device {SCAN_SERIAL} enrolled; the device API accepts its certificate (whoami 200)"
    )
    return cert_path, key_path


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
    with tempfile.TemporaryDirectory(prefix="otaguard-scan-") as work:
        data, port = Path(work) / "srv", free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
        server = subprocess.Popen(
            [sys.executable, "-m", "otaguard", "server", "--data", str(data), "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_listening(port, server)
            if a.cert and a.key:
                cert, key = a.cert, a.key
            else:
                cert, key = enroll_scan_device(data, port, Path(work))
            extra = ["--cert", str(cert), "--key", str(key)]
            print(f"presenting client certificate {cert}")
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
    what = "device API with a client certificate"
    print(f"SUMMARY tls_scan: {what}; Mozilla profile met: {met or 'none'}")
    return 0 if met == "modern" else 1


if __name__ == "__main__":
    sys.exit(main())
