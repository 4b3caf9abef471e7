"""Config files of the long-running commands: ``agent`` and ``server`` (ADR 0030).

``/etc/otaguard/agent.toml`` and ``/etc/otaguard/server.toml`` (or ``--config FILE``) hold
top-level ``key = value`` pairs; ``OTAGUARD_<KEY>`` in the environment overrides a file's
value, and a command-line flag overrides both. Every key is declared here with its type
and range (docs/configuration.md lists them); an unknown key, a wrong type or a value out
of range stops the command with one line naming the key and where it came from.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from otaguard.model.errors import ConfigError

__all__ = [
    "AGENT_CONFIG",
    "AGENT_KEYS",
    "SERVER_CONFIG",
    "SERVER_KEYS",
    "ConfigKey",
    "apply_config",
    "load_config",
    "parse_duration_seconds",
]

AGENT_CONFIG: Final = Path("/etc/otaguard/agent.toml")
SERVER_CONFIG: Final = Path("/etc/otaguard/server.toml")
#: a config file is a few hundred bytes; a large one is the wrong file
MAX_CONFIG_FILE_BYTES: Final = 64 * 1024
_DURATION: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class ConfigKey:
    """One key: its type (str, path, int, float, bool, duration, list, or one of choices),
    its range, and the command-line flag that overrides it."""

    name: str
    kind: str
    flag: str | None = None
    dest: str | None = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        """The environment variable overriding the file's value."""
        return "OTAGUARD_" + self.name.upper()

    @property
    def target(self) -> str:
        """The argparse destination the value lands in."""
        return self.dest or self.name


def parse_duration_seconds(text: str) -> float:
    """``30s``, ``15m``, ``12h``, ``1d`` or a bare number of seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 5m, 12h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _check(key: ConfigKey, value: Any, where: str) -> Any:  # noqa: PLR0912 - one branch per kind
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key.name} must be {expected}, not {value!r}")

    if key.kind in ("str", "path"):
        if not isinstance(value, str) or not value or "\0" in value:
            raise bad("a non-empty string")
        out: Any = Path(value) if key.kind == "path" else value
    elif key.kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        out = value
    elif key.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        out = value
    elif key.kind == "float":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise bad("a number")
        out = float(value)
    elif key.kind == "duration":
        if isinstance(value, bool):
            raise bad("a duration (seconds, or a string such as '5m')")
        try:
            out = float(value) if isinstance(value, int | float) else parse_duration_seconds(value)
        except (ValueError, AttributeError) as e:
            raise bad("a duration (seconds, or a string such as '5m')") from e
    elif key.kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad("a list of strings")
        out = list(value)
    elif key.kind == "table":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a table (key = value pairs under [" + key.name + "])")
        out = dict(value)
    elif key.kind == "choice":
        if value not in key.choices:
            raise bad("one of " + ", ".join(repr(c) for c in key.choices))
        out = value
    else:  # pragma: no cover - the declarations below use the kinds above
        raise AssertionError(key.kind)
    if (key.low is not None and out < key.low) or (key.high is not None and out > key.high):
        raise ConfigError(
            f"{where}: {key.name} = {value!r} is out of range ({key.low:g} to {key.high:g})"
            if key.low is not None and key.high is not None
            else f"{where}: {key.name} = {value!r} is out of range"
        )
    return out


def _from_env(key: ConfigKey, text: str) -> Any:  # noqa: PLR0911 - one return per kind
    """An environment variable's text as the TOML value it stands for."""
    if key.kind == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return text
    if key.kind in ("int", "float"):
        try:
            return int(text) if key.kind == "int" else float(text)
        except ValueError:
            return text
    if key.kind == "list":
        return [v.strip() for v in text.split(",") if v.strip()]
    if key.kind == "table":  # a JSON object, e.g. OTAGUARD_BOOTLOADER='{"type": "grub", ...}'
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def load_config(
    path: Path | None,
    *,
    default: Path,
    keys: Sequence[ConfigKey],
    environ: Mapping[str, str],
) -> dict[str, Any]:
    """The settings of a config file (``path``, else ``default`` if it exists) with the
    environment's overrides, each checked.

    Raises:
        ConfigError: the file given is missing or unreadable, not TOML, or holds an unknown
            key, a wrong type or a value out of range (the one line names the key).
    """
    by_name = {k.name: k for k in keys}
    values: dict[str, Any] = {}
    source = path if path is not None else default
    raw: dict[str, Any] = {}
    try:
        if source.stat().st_size > MAX_CONFIG_FILE_BYTES:
            raise ConfigError(f"config file {source} is too large")
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        if path is not None:
            raise ConfigError(f"config file {path} does not exist") from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {source}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {source} is not valid TOML: {e}") from e
    for name, value in raw.items():
        key = by_name.get(name)
        if key is None:
            raise ConfigError(
                f"{source}: unknown key {name!r} (known: {', '.join(sorted(by_name))})"
            )
        values[name] = _check(key, value, str(source))
    for key in keys:
        text = environ.get(key.env)
        if text:
            values[key.name] = _check(key, _from_env(key, text), key.env)
    return values


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def apply_config(
    a: argparse.Namespace,
    values: Mapping[str, Any],
    *,
    keys: Sequence[ConfigKey],
    argv: Sequence[str],
) -> None:
    """Put the config's values into ``a`` where the command line did not give the flag."""
    for key in keys:
        if key.name in values and not (key.flag and _given(argv, key.flag)):
            setattr(a, key.target, values[key.name])


_LOG = ConfigKey("log_format", "choice", flag="--log-format", choices=("text", "json"))

#: /etc/otaguard/agent.toml
AGENT_KEYS: Final = (
    ConfigKey("device_dir", "path"),
    ConfigKey("poll_interval", "duration", flag="--interval", dest="interval", low=1, high=86400),
    ConfigKey("poll_jitter", "float", flag="--jitter", dest="jitter", low=0, high=0.5),
    ConfigKey("download_min_rate_bps", "int", low=1, high=10**10),
    ConfigKey("download_deadline_base_s", "float", low=1, high=86400),
    ConfigKey("mqtt_url", "str", flag="--mqtt-url"),
    ConfigKey("mqtt_ca", "path", flag="--mqtt-ca"),
    ConfigKey("hint_min_interval", "duration", low=1, high=86400),
    # the device integration (README "Device integration"): over config.json's values,
    # checked as config.json's own (the bootloader spec, "A" and "B" slots)
    ConfigKey("bootloader", "table"),
    ConfigKey("slot_devices", "table"),
    ConfigKey("health_by_units", "bool"),
    _LOG,
)

#: /etc/otaguard/server.toml
SERVER_KEYS: Final = (
    ConfigKey("data", "path", flag="--data"),
    ConfigKey("repo", "path", flag="--repo"),
    ConfigKey("host", "str", flag="--host"),
    ConfigKey("port", "int", flag="--port", low=0, high=65535),
    ConfigKey("director", "path", flag="--director"),
    ConfigKey("static_tree", "path", flag="--static-tree"),
    ConfigKey("trusted_proxies", "list", flag="--trusted-proxy", dest="trusted_proxy"),
    ConfigKey("manufacturer_ca", "path", flag="--manufacturer-ca"),
    ConfigKey("online_key_uri", "str", flag="--online-key-uri"),
    ConfigKey("director_key_uri", "str", flag="--director-key-uri"),
    ConfigKey("database_url", "str", flag="--database-url"),
    ConfigKey("timestamp_expiry", "duration", flag="--timestamp-expiry", low=60, high=366 * 86400),
    ConfigKey("snapshot_expiry", "duration", flag="--snapshot-expiry", low=60, high=366 * 86400),
    ConfigKey(
        "device_cert_lifetime", "duration", flag="--device-cert-lifetime", low=60, high=366 * 86400
    ),
    ConfigKey("rollout_interval", "float", flag="--rollout-interval", low=0.1, high=3600),
    ConfigKey("header_timeout", "float", flag="--header-timeout", low=0.1, high=60),
    ConfigKey("access_log", "bool", flag="--no-access-log", dest="access_log"),
    _LOG,
)
