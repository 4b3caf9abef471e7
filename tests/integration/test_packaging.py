"""``pip install 'otaguard[agent]'`` is a device's install: no web framework, no ORM.

One test (it builds a fresh venv from this source tree through the package index, a
minute or two): the agent-only install lacks FastAPI, uvicorn, SQLAlchemy, alembic, psycopg
and pydantic, its ``otaguard agent --help`` works, it updates a real device from a real
server over mutual TLS (``agent update``, then ``agent status --json``), and a server
command names the extra to install in one line instead of an ImportError traceback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import World

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "psycopg", "pydantic", "starlette")
#: a fresh venv resolves and installs the agent's dependencies from the package index
INSTALL_TIMEOUT_S = 600


def _agent_venv(tmp_path: Path) -> Path:
    """A new venv with ``otaguard[agent]`` built from a copy of this source tree."""
    src = tmp_path / "src-copy"
    # A copy: the build writes build/ and *.egg-info, never into the worktree under test.
    shutil.copytree(
        ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "agent-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    got = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{src}[agent]"],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_agent_extra_installs_only_what_a_device_needs(tmp_path: Path, world: World) -> None:
    venv = _agent_venv(tmp_path)
    py, otaguard = venv / "bin" / "python", venv / "bin" / "otaguard"
    installed = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; "
         "print('\\n'.join(sorted(d.metadata['Name'].lower() for d in m.distributions())))"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    assert "otaguard" in installed
    assert [name for name in SERVER_ONLY if name in installed] == []
    for module in SERVER_ONLY:
        probe = subprocess.run(
            [str(py), "-c", f"import {module}"], capture_output=True, timeout=60, check=False
        )
        assert probe.returncode != 0, f"{module} is importable in the agent-only venv"

    helped = subprocess.run(
        [str(otaguard), "agent", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert helped.returncode == 0, helped.stderr
    assert "usage: otaguard agent" in helped.stdout

    # a server command: one line naming the extra, exit 2, no traceback
    refused = subprocess.run(
        [str(otaguard), "server", "--data", str(tmp_path / "srv")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: this command needs otaguard's server extra (module fastapi is not installed): "
        "pip install 'otaguard[server]'"
    ]
    assert "Traceback" not in refused.stderr

    # the agent-only install updates a real device from the real server
    dev = world.device()
    world.release("1.1.0")
    updated = subprocess.run(
        [str(otaguard), "agent", str(dev.paths.root), "update"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert updated.returncode == 0, updated.stderr
    assert "updated 1.0.0 → 1.1.0" in updated.stdout
    status = subprocess.run(
        [str(otaguard), "agent", str(dev.paths.root), "status", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    doc = json.loads(status.stdout)
    primary = doc["slots"][doc["primary"]]["image"]
    assert (primary["version"], doc["floor"]["version"]) == ("1.1.0", "1.1.0")
