"""A compromised director, for the demo and the attack tests.

Uptane's threat: an attacker takes the update server, with the director's online key
(loaded here from the server's data directory, as such an attacker would) and the
server's code (the director's answer is replaced). It may then instruct any device to
install anything; the device must still install only what the image repository's
offline keys signed, and no older than what it runs, and report the attempt.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer

from otaguard.model.errors import OperatorError
from otaguard.model.manifest import InstalledTarget
from otaguard.model.release import ReleaseInfo
from otaguard.model.version import Version
from otaguard.server.director import (
    Director,
    DirectorRelease,
    load_director_signer,
    sign_instruction,
)

__all__ = ["CompromisedDirector"]


class CompromisedDirector:
    """An attacker in control of a running server's director (its key and its code).

    Args:
        director: the running server's director (``app.state.director``).
        data_dir: the server's data directory (the director key is read from it).
    """

    def __init__(self, director: Director | None, data_dir: Path):
        if director is None:
            raise OperatorError("the server runs no director")
        self.director = director
        #: the real director key, stolen from the data directory
        self.signer: Signer = load_director_signer(data_dir)
        self._honest = director.answer
        #: every answer the real director gave while watched (for replays)
        self.captured: list[bytes] = []

    def _replace(self, fn: Callable[..., bytes]) -> None:
        # The attacker runs the server: replacing its code is within the threat.
        self.director.answer = fn  # type: ignore[method-assign]

    def watch(self) -> None:
        """Let the director answer honestly, recording each answer (to replay later)."""

        def answer(**kw: Any) -> bytes:
            data = self._honest(**kw)
            self.captured.append(data)
            return data

        self._replace(answer)

    def restore(self) -> None:
        """Give the director its honest code back."""
        self._replace(self._honest)

    def instruct(
        self,
        *,
        name: str,
        length: int,
        sha256: str,
        version: str = "99.0.0",
        security_counter: int = 99,
        signer: Signer | None = None,
        expired: bool = False,
    ) -> None:
        """Sign, with the stolen key (or ``signer``), an instruction of the attacker's choice.

        Args:
            name: target name (one the image repository lacks, or one it lists).
            length: the length to claim.
            sha256: the hash to claim (another image's).
            version: version to claim.
            security_counter: counter to claim.
            signer: sign with this key instead of the director's (a key the director
                root does not name).
            expired: sign an instruction that expired an hour ago.
        """

        def answer(
            *,
            serial: str,
            hardware_id: str,
            installed: InstalledTarget | None,
            nonce: str,
            recorded: object = None,
        ) -> bytes:
            del installed, recorded
            release = DirectorRelease(
                name=name,
                length=length,
                hashes={"sha256": sha256},
                info=ReleaseInfo(
                    Version.parse(version), security_counter, (hardware_id,), "security"
                ),
            )
            now = dt.datetime.now(dt.UTC) - (dt.timedelta(hours=1) if expired else dt.timedelta())
            return sign_instruction(
                release,
                serial=serial,
                hardware_id=hardware_id,
                nonce=nonce,
                now=now,
                signer=signer or self.signer,
            )

        self._replace(answer)

    def replay(self, data: bytes) -> None:
        """Answer every check-in with ``data`` (an instruction captured earlier)."""

        def answer(**_: Any) -> bytes:
            return data

        self._replace(answer)
