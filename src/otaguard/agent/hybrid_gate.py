"""The device's hybrid policy check, over the exact metadata bytes ngclient is handed.

python-tuf's ``Updater`` verifies thresholds; it cannot require a classical AND an
ML-DSA signature (ADR 0014). Rather than re-implement the client workflow or patch its
internals, the check sits at the one seam python-tuf offers: the fetcher. Every
metadata file ngclient downloads passes through :class:`HybridGate` before ngclient sees
it, and is refused (:class:`~otaguard.model.errors.HybridPolicyError`) unless it meets
the hybrid policy of the root it will be verified against:

1. ``N.root.json``: the policy of root ``N-1`` (by N-1's keys) and its own (by N's keys),
   so a root that drops the policy needs a hybrid signature by the keys that set it;
   checked *before* ngclient can persist it as the device's new trust anchor (a root
   below the old or its own threshold is left to ngclient, which refuses it naming that);
2. ``timestamp.json``, ``N.snapshot.json``, ``N.targets.json``: the policy of the
   device's current root (``root.json``, which ngclient has already moved to the newest
   verified root when these are fetched). A file below that root's threshold is left to
   ngclient, which refuses it against the same root naming the threshold.

ngclient also loads files from its cache without fetching them; a root that newly marks
a role hybrid must not let a cached, non-hybrid targets through, so
:func:`check_trusted_files` runs over what ngclient trusts after every refresh.

The checks are :mod:`otaguard.crypto.hybrid`'s pure functions; this module only feeds them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Final

from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface

from otaguard.crypto.hybrid import check_hybrid_bytes, check_root_update
from otaguard.model.errors import VerificationError

__all__ = ["HybridGate", "check_trusted_files"]

_ROOT_NAME: Final = re.compile(r"([0-9]+)\.root\.json")
_ROLE_NAME: Final = re.compile(r"(?:[0-9]+\.)?(timestamp|snapshot|targets)\.json")


def _root(data: bytes, what: str) -> Root:
    try:
        md = Metadata[Root].from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError) as e:
        raise VerificationError(f"{what}: not root metadata: {e}") from e
    if not isinstance(md.signed, Root):
        raise VerificationError(f"{what}: not root metadata")
    return md.signed


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise VerificationError(f"cannot read trusted metadata {path.name}: {e.strerror}") from e


def check_trusted_files(metadata_dir: Path) -> None:
    """The hybrid policy over the files ngclient trusts after a refresh (its cache).

    Raises:
        HybridPolicyError: a trusted file does not meet the current root's policy.
        VerificationError: the trusted root cannot be read.
    """
    root_bytes = _read(metadata_dir / "root.json")
    if root_bytes is None:
        raise VerificationError("no trusted root.json after refresh")
    root = _root(root_bytes, "trusted root")
    check_hybrid_bytes(root, Root.type, root_bytes, what=f"trusted root v{root.version}")
    for role in ("timestamp", "snapshot", "targets"):
        data = _read(metadata_dir / f"{role}.json")
        if data is not None:
            check_hybrid_bytes(root, role, data, what=f"trusted {role}.json")


class HybridGate(FetcherInterface):
    """A fetcher that refuses metadata not meeting the hybrid policy, then hands it on.

    Args:
        inner: the device's real fetcher (TLS, limits, cancellation).
        metadata_base_url: ngclient's metadata URL prefix (files below it are checked).
        metadata_dir: ngclient's metadata directory (``root.json``, ``root_history/``).
        trusted_root: the root ngclient is bootstrapped with.
    """

    def __init__(
        self,
        inner: FetcherInterface,
        *,
        metadata_base_url: str,
        metadata_dir: Path,
        trusted_root: bytes,
    ) -> None:
        self._inner = inner
        self._base = metadata_base_url
        self._dir = Path(metadata_dir)
        first = _root(trusted_root, "trusted root")
        self._roots: dict[int, Root] = {first.version: first}

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._inner.fetch(url)

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Targets and anything else: the inner fetcher's, unchanged."""
        with self._inner.download_file(url, max_length) as f:
            yield f

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """Metadata: downloaded by the inner fetcher, then checked, then handed on.

        Raises:
            HybridPolicyError: see the module docstring.
        """
        data = self._inner.download_bytes(url, max_length)
        if url.startswith(self._base):
            self._check(url[len(self._base) :], data)
        return data

    def _previous_root(self, version: int) -> Root:
        known = self._roots.get(version)
        if known is not None:
            return known
        data = _read(self._dir / "root_history" / f"{version}.root.json")
        if data is None:
            raise VerificationError(f"no trusted root v{version} to check v{version + 1} against")
        return _root(data, f"cached root v{version}")

    def _current_root(self) -> Root:
        data = _read(self._dir / "root.json")
        newest = self._roots[max(self._roots)]
        if data is None:
            return newest
        cached = _root(data, "trusted root")
        return cached if cached.version >= newest.version else newest

    def _check(self, name: str, data: bytes) -> None:
        if m := _ROOT_NAME.fullmatch(name):
            version = int(m.group(1))
            previous = self._previous_root(version - 1)
            if _below_threshold(previous, Root.type, data) or _below_own_threshold(data):
                return  # python-tuf refuses it (old or new threshold), naming that
            self._roots[version] = check_root_update(previous, data, what=name)
        elif m := _ROLE_NAME.fullmatch(name):
            root, role = self._current_root(), m.group(1)
            if _below_threshold(root, role, data):
                return  # python-tuf refuses it against this same root, naming its threshold
            check_hybrid_bytes(root, role, data, what=name)


def _below_own_threshold(data: bytes) -> bool:
    """True when a new root is not signed by a threshold of its own root keys."""
    try:
        md = Metadata.from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError):
        return True
    return not isinstance(md.signed, Root) or _below_threshold(md.signed, Root.type, data)


def _below_threshold(root: Root, role: str, data: bytes) -> bool:
    """True when python-tuf's own threshold check of ``root`` fails ``data`` (or it does not
    parse): ngclient will refuse it with that reason, the clearer one."""
    try:
        md = Metadata.from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError):
        return True
    if role not in root.roles:
        return True
    return not root.get_verification_result(role, md.signed_bytes, md.signatures).verified
