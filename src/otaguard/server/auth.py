"""Operator tokens and roles: who may call which operator route.

Two kinds of token, both bearer tokens of 256 random bits, never logged:

* the **bootstrap** token in ``DATA/operator-token``, generated on first run, compared in
  constant time; it is the ``admin`` named ``bootstrap`` (it makes the first operator
  tokens, and stays the break-glass admin while the file exists);
* **named** tokens made by an admin (``otaguard operator add NAME --role R``, or
  ``otaguard server operator add`` on the data directory): stored only as their SHA-256
  with a name and a role; revoking one refuses it from the next request on.

Roles are ordered, each allowing what the ones below allow:
``viewer`` (reads) < ``operator`` (quarantine, release, revoke, register devices,
enrollment tokens, tags and groups) < ``release-manager`` (publish) < ``admin``
(operator tokens). Every operator route names the role it needs
(:meth:`OperatorAuth.require`); a token below it gets a 403 naming both roles.
"""

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Final

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from otaguard._fs import atomic_write_bytes
from otaguard.model.errors import ConfigError
from otaguard.server.storage.fleet_base import OperatorStore

__all__ = [
    "AUDIT_SCOPE_KEY",
    "BOOTSTRAP_OPERATOR",
    "OPERATOR_NAME_PATTERN",
    "OPERATOR_TOKEN_FILE",
    "RESERVED_OPERATOR_NAMES",
    "ROLE_ATTRIBUTE",
    "AuditContext",
    "AuditIntent",
    "Operator",
    "OperatorAuth",
    "Role",
    "check_operator_name",
    "hash_operator_token",
    "load_or_create_operator_token",
    "new_operator_token",
    "note_audit",
    "token_matches",
]

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


def new_operator_token() -> str:
    """A fresh operator token (256 random bits, URL-safe text)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_operator_token(token: str) -> str:
    """The stored form of a named operator token (SHA-256 hex).

    A token is 256 random bits, so an unsalted fast hash is enough: there is nothing to
    guess, and a stolen hash does not give the token back.
    """
    return hashlib.sha256(token.encode()).hexdigest()


#: the name the audit log gives the bootstrap token of ``DATA/operator-token``
BOOTSTRAP_OPERATOR: Final = "bootstrap"
OPERATOR_NAME_PATTERN: Final = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME_RE: Final = re.compile(OPERATOR_NAME_PATTERN)
# Reserved: the bootstrap token's name, and what the data-directory commands record.
RESERVED_OPERATOR_NAMES: Final = frozenset({BOOTSTRAP_OPERATOR, "local"})


def check_operator_name(name: str) -> str:
    """Return ``name`` if it may name an operator token.

    Raises:
        ValueError: it breaks the rule or is reserved; the message says which.
    """
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid operator name {name!r}: use 1-64 lower-case letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    if name in RESERVED_OPERATOR_NAMES:
        raise ValueError(f"operator name {name!r} is reserved")
    return name


class Role(StrEnum):
    """Operator roles, lowest first; a role allows everything the lower ones do."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    RELEASE_MANAGER = "release-manager"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Position in the order (viewer 0 ... admin 3)."""
        return list(Role).index(self)

    def allows(self, needed: "Role") -> bool:
        """Whether a token of this role may do what ``needed`` may."""
        return self.rank >= needed.rank


@dataclass(frozen=True)
class Operator:
    """An authenticated operator: the token's name and role (never the token)."""

    name: str
    role: Role


@dataclass
class AuditIntent:
    """What the audit middleware records after the response: filled by the route."""

    actor: str
    role: str
    action: str
    target: str = ""
    detail: str = ""


@dataclass
class AuditContext:
    """Per request, in the ASGI scope under :data:`AUDIT_SCOPE_KEY`."""

    request_id: str
    intent: AuditIntent | None = None


#: attribute naming the role a :meth:`OperatorAuth.require` dependency checks (OpenAPI)
ROLE_ATTRIBUTE: Final = "otaguard_required_role"
#: the ASGI scope key of the request's :class:`AuditContext`
AUDIT_SCOPE_KEY: Final = "otaguard.audit"


def note_audit(request: Request, *, target: str | None = None, detail: str | None = None) -> None:
    """Add the target or a detail to the request's audit entry (no-op when not audited).

    Routes call it for what only they know: the serial in a request body, the tags set.
    Never pass a secret.
    """
    ctx = request.scope.get(AUDIT_SCOPE_KEY)
    if isinstance(ctx, AuditContext) and ctx.intent is not None:
        if target is not None:
            ctx.intent.target = target
        if detail is not None:
            ctx.intent.detail = detail


# Path parameters that name what an action is about, in order of preference.
_TARGET_PARAMS: Final = ("serial", "name", "filename", "alert_id")


class OperatorAuth:
    """Authenticates operator bearer tokens and checks roles."""

    def __init__(self, *, bootstrap_token: str, operators: OperatorStore):
        """Check tokens against the bootstrap token and the named ones.

        Args:
            bootstrap_token: the token in ``DATA/operator-token`` (an admin).
            operators: where named tokens are kept.
        """
        self._bootstrap = bootstrap_token
        self._operators = operators
        # One dependency object per (role, action): FastAPI runs a dependency used both
        # by the route and by a parameter once per request.
        self._dependencies: dict[tuple[Role, str | None], Callable[..., Operator]] = {}
        self._bearer = HTTPBearer(
            auto_error=False,
            scheme_name="operatorToken",
            description="An operator token: DATA/operator-token (bootstrap admin) or one "
            "made by 'otaguard operator add NAME --role ROLE'. Each route names the role it "
            "needs (x-required-role): viewer < operator < release-manager < admin.",
        )

    def identify(self, presented: str | None) -> Operator | None:
        """The operator a token belongs to; ``None`` for no, unknown or revoked token."""
        if not presented:
            return None
        if token_matches(presented, self._bootstrap):
            return Operator(BOOTSTRAP_OPERATOR, Role.ADMIN)
        rec = self._operators.by_token_hash(hash_operator_token(presented))
        if rec is None or rec.revoked_at is not None:
            return None
        return Operator(rec.name, Role(rec.role))

    def authenticate(self, presented: str | None) -> Operator:
        """Like :meth:`identify`, but refuses with a 401 saying why.

        Raises:
            HTTPException: 401, no token, an unknown one, or a revoked one.
        """
        why = "operator token missing or wrong"
        if presented:
            if token_matches(presented, self._bootstrap):
                return Operator(BOOTSTRAP_OPERATOR, Role.ADMIN)
            rec = self._operators.by_token_hash(hash_operator_token(presented))
            if rec is not None and rec.revoked_at is None:
                return Operator(rec.name, Role(rec.role))
            if rec is not None:
                why = f"the operator token {rec.name!r} was revoked"
                logger.warning("refused the revoked operator token %s", rec.name)
            else:
                # Never the token itself: only that one was presented and matched nothing.
                logger.warning("refused an unknown operator token")
        raise HTTPException(401, why, headers={"WWW-Authenticate": "Bearer"})

    def require(self, role: Role, *, action: str | None = None) -> Callable[..., Operator]:
        """A FastAPI dependency: a token of at least ``role``; with ``action``, audited.

        An audited route is recorded by the audit middleware after its response, with
        the outcome, whether it succeeded or was refused for its role (403).
        """
        cached = self._dependencies.get((role, action))
        if cached is not None:
            return cached
        bearer = self._bearer

        def dependency(
            request: Request,
            creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        ) -> Operator:
            op = self.authenticate(creds.credentials if creds else None)
            ctx = request.scope.get(AUDIT_SCOPE_KEY)
            if action is not None and isinstance(ctx, AuditContext):
                params = request.path_params
                target = next((str(params[p]) for p in _TARGET_PARAMS if p in params), "")
                ctx.intent = AuditIntent(op.name, op.role.value, action, target)
            if not op.role.allows(role):
                raise HTTPException(
                    403,
                    f"operator {op.name} has role {op.role.value}; "
                    f"{action or 'this request'} needs {role.value} or above",
                )
            return op

        setattr(dependency, ROLE_ATTRIBUTE, role)
        self._dependencies[(role, action)] = dependency
        return dependency
