"""Config files, log formats, --json and pipe-safe tables, a taken port (ADR 0030)."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from otaguard._logging import configure_logging
from otaguard.cli._config import AGENT_KEYS, SERVER_KEYS, apply_config, load_config
from otaguard.cli._output import emit_table, jsonable
from otaguard.model.errors import ConfigError


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> dict[str, object]:
    f = tmp_path / "server.toml"
    f.write_text(text)
    return load_config(f, default=f, keys=SERVER_KEYS, environ=env or {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 8443\n", "unknown key 'prot'"),
        ('port = "8443"\n', "port must be an integer, not '8443'"),
        ("port = 70000\n", "port = 70000 is out of range (0 to 65535)"),
        ("header_timeout = 0\n", "header_timeout = 0 is out of range"),
        ('timestamp_expiry = "soon"\n', "timestamp_expiry must be a duration"),
        ('log_format = "xml"\n', "log_format must be one of 'text', 'json'"),
        ("port = [\n", "is not valid TOML"),
    ],
)
def test_a_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert message in e.value.diagnostics()
    assert "\n" not in e.value.diagnostics()


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    values = _load(
        tmp_path,
        'port = 9000\nhost = "::1"\ntimestamp_expiry = "12h"\n',
        env={"OTAGUARD_PORT": "9100", "OTAGUARD_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.2"},
    )
    assert values["port"] == 9100
    assert values["timestamp_expiry"] == 12 * 3600
    assert values["trusted_proxies"] == ["10.0.0.1", "10.0.0.2"]
    import argparse

    a = argparse.Namespace(port=9443, host="127.0.0.1", trusted_proxy=None)  # as parsed
    apply_config(a, values, keys=SERVER_KEYS, argv=["server", "--port", "9443"])
    assert (a.port, a.host, a.trusted_proxy) == (9443, "::1", ["10.0.0.1", "10.0.0.2"])
    with pytest.raises(ConfigError, match="OTAGUARD_PORT: port must be an integer"):
        _load(tmp_path, "", env={"OTAGUARD_PORT": "many"})


def test_missing_default_file_is_fine_a_missing_given_file_is_not(tmp_path: Path) -> None:
    absent = tmp_path / "none.toml"
    assert load_config(None, default=absent, keys=AGENT_KEYS, environ={}) == {}
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(absent, default=absent, keys=AGENT_KEYS, environ={})


def test_json_log_lines_carry_time_and_fields_and_one_line_errors() -> None:
    buf = io.StringIO()
    configure_logging(level=logging.INFO, fmt="json", stream=buf)
    log = logging.getLogger("otaguard.access")
    log.info("GET / 200", extra={"method": "GET", "path": "/", "status": 200})
    try:
        raise OSError("disk\nfull")
    except OSError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first["time"].endswith("Z") and first["status"] == 200 and first["path"] == "/"
    assert second["error"] == "OSError: disk full" and "traceback" not in second
    text = io.StringIO()
    configure_logging(level=logging.INFO, fmt="text", stream=text)
    logging.getLogger("otaguard.x").warning("hello %s", "there")
    assert text.getvalue().split(" ", 1)[1] == "WARNING otaguard.x: hello there\n"
    configure_logging(level=logging.WARNING, fmt="text")


def test_piped_tables_are_plain_and_never_cut() -> None:
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=40)
    assert not console.is_terminal
    digest = "ab" * 32
    emit_table(console, title="Device", columns=("slot", "sha256"), rows=[["A", digest]])
    assert buf.getvalue().splitlines() == ["Device", "SLOT  SHA256", f"A     {digest}"]
    assert jsonable({"t": (1, Path("/x"))}) == {"t": [1, "/x"]}


def test_a_taken_port_is_its_own_exit_code_and_one_line(tmp_path: Path) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        got = subprocess.run(
            [sys.executable, "-m", "otaguard", "server", "init", "--data", str(tmp_path / "s")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        got = subprocess.run(
            [sys.executable, "-m", "otaguard", "server", "--data", str(tmp_path / "s"),
             "--port", str(port)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        held.close()
    assert got.returncode == 78
    last = got.stderr.strip().splitlines()[-1]
    assert last == (
        f"address in use: cannot listen on 127.0.0.1:{port}: another process is listening "
        "there (stop it, or choose another --port)"
    )
    assert "Traceback" not in got.stderr
