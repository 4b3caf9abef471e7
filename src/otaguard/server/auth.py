"""The operator token: generated on first run, compared in constant time, never logged."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from otaguard._fs import atomic_write_bytes
from otaguard.model.errors import ConfigError

__all__ = ["OPERATOR_TOKEN_FILE", "load_or_create_operator_token", "token_matches"]

logger = logging.getLogger(__name__)

OPERATOR_TOKEN_FILE: Final = "operator-token"  # noqa: S105 - a file name, not a secret
# 32 random bytes (256 bits) cannot be guessed; below 128 bits we refuse the file.
TOKEN_BYTES: Final = 32
MIN_TOKEN_CHARS: Final = 22
# A token file larger than this is not a token.
MAX_TOKEN_FILE_BYTES: Final = 1024


def load_or_create_operator_token(data_dir: Path) -> str:
    """Return the operator token in ``data_dir/operator-token``, creating it (0600) if absent.

    Raises:
        ConfigError: the file is unreadable, too short, or readable by others.
    """
    path = Path(data_dir) / OPERATOR_TOKEN_FILE
    if not path.exists():
        atomic_write_bytes(path, secrets.token_urlsafe(TOKEN_BYTES).encode() + b"\n", mode=0o600)
        logger.info("created operator token file %s", path)
    try:
        mode = path.stat().st_mode
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read operator token file {path}: {e.strerror}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} is accessible by other users; chmod 600 it")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} does not hold an operator token") from e
    if len(raw) > MAX_TOKEN_FILE_BYTES or len(token) < MIN_TOKEN_CHARS or not token.isprintable():
        raise ConfigError(f"{path} does not hold an operator token")
    if os.name == "posix" and path.stat().st_uid != os.getuid():
        logger.warning("operator token file %s is owned by another user", path)
    return token


def token_matches(presented: str | None, expected: str) -> bool:
    """Compare a presented bearer token with the expected one in constant time."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())
