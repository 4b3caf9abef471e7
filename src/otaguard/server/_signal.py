"""A change signal the server processes sharing one data directory see at once.

Writers :meth:`ChangeSignal.touch` a small file in the data directory after a change they
committed (a publication, a device's status); readers compare :meth:`ChangeSignal.token`
(one ``stat``, about a microsecond, no database) with the one their cache was built
under. Every worker of one deployment shares the data directory (ADR 0009), so a
quarantine by any of them reaches the caches of all on their next request.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

__all__ = ["ChangeSignal"]

logger = logging.getLogger(__name__)


class ChangeSignal:
    """One named signal file (``DATA/.signal-<name>``)."""

    def __init__(self, data_dir: Path, name: str):
        """Use ``data_dir``/``.signal-<name>`` (created on the first :meth:`touch`)."""
        self.path = Path(data_dir) / f".signal-{name}"

    def token(self) -> tuple[int, int, int] | None:
        """What identifies the file's last write (inode, size, change time); ``None``
        when there is no file yet, or it cannot be read (callers treat that as changed)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_ctime_ns)

    def ensure(self) -> None:
        """Create the file if there is none, without announcing a change: a cache kept
        "until the next announcement" needs a file to compare with (no file reads
        always), and a server that never wrote (no rollout yet, say) would otherwise
        leave its caches unused. A failure is logged; callers then read every time."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        except OSError as e:
            logger.warning("cannot create the change signal %s: %s", self.path, e.strerror)
            return
        os.close(fd)

    def touch(self) -> None:
        """Announce a change: replace the file (a new inode, so the token changes even
        within one clock tick). A failure is logged; caches also expire by themselves."""
        tmp = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            tmp.write_bytes(secrets.token_bytes(8))
            os.replace(tmp, self.path)
        except OSError as e:
            logger.warning("cannot write the change signal %s: %s", self.path, e.strerror)
            tmp.unlink(missing_ok=True)
