"""A private nginx for tests: the shipped template, rendered, on a free loopback port.

nginx (Debian package nginx-light, ``make sysdeps``) runs in the foreground with its own
prefix, configuration, pid and logs in a temporary directory, and is stopped by its PID.
Under ``CI=true`` a missing nginx fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

NGINX = "/usr/sbin/nginx"
TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "otaguard.conf"
#: the static topology: nginx serves the static tree, otaguard answers auth_request
STATIC_TEMPLATE = TEMPLATE.with_name("otaguard-static.conf")
STARTUP_TIMEOUT_S = 20.0


def nginx_binary() -> str | None:
    """The nginx binary, or ``None``."""
    if os.access(NGINX, os.X_OK):
        return NGINX
    return shutil.which("nginx")


def require_nginx() -> str:
    """Return nginx's path; skip (outside CI) or fail (in CI) when it is missing."""
    found = nginx_binary()
    if found is not None:
        return found
    reason = "nginx tests need nginx (apt-get install nginx-light, or make sysdeps)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` just now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def render(values: dict[str, str], template: Path = TEMPLATE) -> str:
    """A shipped template with every placeholder replaced (an unknown one fails)."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "{{" not in body, "a placeholder of the template was not filled"
    return text


@dataclass
class Nginx:
    """A running private nginx; :meth:`stop` it."""

    proc: subprocess.Popen[bytes]
    port: int
    directory: Path

    @property
    def error_log(self) -> str:
        """nginx's error log so far."""
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def access_log(self) -> str:
        """The template's device request log so far (verification result, subject)."""
        path = self.directory / "otaguard-access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log_line(self, *needles: str, timeout: float = 5.0) -> str:
        """The last access log line holding every needle (nginx logs after it answers)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.access_log.splitlines() if all(n in ln for n in needles)]
            if lines:
                return lines[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no access log line with {needles}:\n{self.access_log}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop nginx (its master, by PID) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_nginx(directory: Path, values: dict[str, str], template: Path = TEMPLATE) -> Nginx:
    """Render ``template`` with ``values`` (LISTEN is chosen here) and start nginx."""
    binary = require_nginx()
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    site = directory / "otaguard.conf"
    site.write_text(
        render(
            {
                **values,
                "LISTEN": f"127.0.0.1:{port}",
                "ACCESS_LOG": str(directory / "otaguard-access.log"),
            },
            template,
        )
    )
    temp = directory / "tmp"
    # As root the workers would switch to an unprivileged user who cannot read this
    # private directory; they stay root here (a test, on loopback).
    user = "user root;\n" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(
        f"{user}worker_processes 1;\npid {directory}/nginx.pid;\n"
        f"error_log {directory}/error.log info;\n"
        "events { worker_connections 64; }\n"
        "http {\n"
        f"  access_log {directory}/access.log;\n"
        f"  client_body_temp_path {temp}/body;\n  proxy_temp_path {temp}/proxy;\n"
        f"  fastcgi_temp_path {temp}/fastcgi;\n  uwsgi_temp_path {temp}/uwsgi;\n"
        f"  scgi_temp_path {temp}/scgi;\n"
        f"  include {site};\n"
        "}\n"
    )
    args = [binary, "-p", str(directory), "-c", str(directory / "nginx.conf")]
    args += ["-e", str(directory / "error.log")]
    check = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    with (directory / "stderr.log").open("wb") as stderr:
        proc = subprocess.Popen(
            [*args, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=stderr
        )
    running = Nginx(proc, port, directory)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            stderr = (directory / "stderr.log").read_text(errors="replace")
            raise AssertionError(f"nginx exited with {proc.returncode}: {stderr}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return running
        except OSError:
            if time.monotonic() > deadline:
                running.stop()
                raise AssertionError("nginx did not start listening in time") from None
            time.sleep(0.05)
