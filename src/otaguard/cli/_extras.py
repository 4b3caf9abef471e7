"""Which optional extra a command needs, from the module it failed to import.

otaguard installs per role (ADR 0029): ``otaguard[agent]`` on a device, ``[server]`` on the
update server, ``[release]`` on the signing machine. The CLI imports server and release code
lazily, inside the command that uses it, so every install parses every command; a command
whose extra is missing stops with one line naming the extra, never an ImportError traceback.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXTRA_OF_MODULE", "missing_extra_message"]

#: top-level module -> the extra that installs it (the first extra listed wins when several
#: install it: the server's commands are the ones that import its libraries first)
EXTRA_OF_MODULE: Final[dict[str, str]] = {
    "fastapi": "server",
    "starlette": "server",
    "uvicorn": "server",
    "h11": "server",
    "httptools": "server",
    "uvloop": "server",
    "pydantic": "server",
    "sqlalchemy": "server",
    "alembic": "server",
    "psycopg": "server",
    "univers": "server",
    "packageurl": "server",
    "cyclonedx": "release",
    "detools": "release",
    "pkcs11": "release",
    "tpm2_pytss": "tpm",
}


def missing_extra_message(e: ModuleNotFoundError) -> str | None:
    """The one line for a missing optional dependency, or ``None`` if ``e`` is not one."""
    top = (e.name or "").split(".", 1)[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (
        f"this command needs otaguard's {extra} extra (module {top} is not installed): "
        f"pip install 'otaguard[{extra}]'"
    )
