"""nginx for a benchmark: a private prefix, one worker, the site configuration given.

Shared by the benchmarks that measure otaguard beside nginx (`checkin_throughput.py`,
`serve_metadata.py`); they run as scripts, so this directory is on their import path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

__all__ = ["NGINX", "prepare_nginx_dir", "run_nginx"]

NGINX: Final = "/usr/sbin/nginx"


def prepare_nginx_dir(d: Path) -> None:
    """Make nginx's temporary directories under ``d`` (it writes nothing elsewhere)."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / "tmp" / sub).mkdir(parents=True, exist_ok=True)


def run_nginx(d: Path, site_conf: Path) -> subprocess.Popen[bytes]:
    """Check and start nginx with prefix ``d`` serving ``site_conf``; exit if it cannot."""
    prepare_nginx_dir(d)
    user = "user root;\n" if os.geteuid() == 0 else ""
    tmp = d / "tmp"
    (d / "nginx.conf").write_text(
        f"{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
        "events { worker_connections 1024; }\nhttp {\n"
        f"  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
        f"  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n"
        f"  scgi_temp_path {tmp}/scgi;\n  include {site_conf};\n}}\n"
    )
    binary = NGINX if os.access(NGINX, os.X_OK) else shutil.which("nginx")
    if binary is None:
        raise SystemExit("nginx is missing (make sysdeps)")
    args = [binary, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
    check = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise SystemExit(f"nginx -t: {check.stderr}")
    return subprocess.Popen([*args, "-g", "daemon off;"], stdout=subprocess.DEVNULL)
