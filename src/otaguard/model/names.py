"""The one rule for names that travel: target names and hardware ids.

A target name becomes a URL path component on the server, a blob file name
(``<sha256>.<name>``) and a staging file name on the device; a hardware id becomes part
of topics and queries. The release tool, the server and the device all check names with
these functions, so the tool refuses exactly what the server would.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "DEVICE_SERIAL_PATTERN",
    "HARDWARE_ID_PATTERN",
    "MAX_DEVICE_SERIAL",
    "MAX_HARDWARE_ID",
    "MAX_TARGET_NAME",
    "TARGET_NAME_PATTERN",
    "check_device_serial",
    "check_hardware_id",
    "check_target_name",
]

# One path component: must start with a letter or digit, so ".", ".." and hidden temp
# files (".x.tmp") never match; no "/", "%", "+" or spaces (URL- and shell-safe as is).
# 190: the server stores a target as "<64 hex digits>.<name>", one file name, and file
# systems cap a name at 255 bytes (NAME_MAX): 65 + 190 = 255.
MAX_TARGET_NAME: Final = 190
TARGET_NAME_PATTERN: Final = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_TARGET_NAME - 1}}}"
# Hardware ids are product identifiers such as "gw-v1" or "acme:gateway.2".
MAX_HARDWARE_ID: Final = 128
HARDWARE_ID_PATTERN: Final = rf"[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_HARDWARE_ID - 1}}}"

# Device serials become a certificate CN, a URL path component and an HTTP Basic user
# name (no ":"), so the same safe alphabet as target names, and 64 characters, the
# X.509 upper bound for a common name.
MAX_DEVICE_SERIAL: Final = 64
DEVICE_SERIAL_PATTERN: Final = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_DEVICE_SERIAL - 1}}}"

_SERIAL_RE: Final = re.compile(DEVICE_SERIAL_PATTERN)
_TARGET_RE: Final = re.compile(TARGET_NAME_PATTERN)
_HARDWARE_RE: Final = re.compile(HARDWARE_ID_PATTERN)


def check_target_name(name: str) -> str:
    """Return ``name`` if it is a valid target name.

    Raises:
        ValueError: the name breaks the rule; the message states the rule.
    """
    if not isinstance(name, str) or _TARGET_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid target name {name!r}: use 1-{MAX_TARGET_NAME} letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_hardware_id(hardware_id: str) -> str:
    """Return ``hardware_id`` if it is a valid hardware id.

    Raises:
        ValueError: the id breaks the rule; the message states the rule.
    """
    if not isinstance(hardware_id, str) or _HARDWARE_RE.fullmatch(hardware_id) is None:
        raise ValueError(
            f"invalid hardware id {hardware_id!r}: use 1-{MAX_HARDWARE_ID} letters, digits, "
            "'.', '_', ':' or '-', starting with a letter or digit"
        )
    return hardware_id


def check_device_serial(serial: str) -> str:
    """Return ``serial`` if it is a valid device serial.

    Raises:
        ValueError: the serial breaks the rule; the message states the rule.
    """
    if not isinstance(serial, str) or _SERIAL_RE.fullmatch(serial) is None:
        raise ValueError(
            f"invalid device serial {serial!r}: use 1-{MAX_DEVICE_SERIAL} letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return serial
