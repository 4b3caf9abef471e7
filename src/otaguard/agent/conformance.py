"""The agent's verification path behind tuf-conformance's client protocol.

`tuf-conformance <https://github.com/theupdateframework/tuf-conformance>`_ drives a TUF
client through three commands (``init``, ``refresh``, ``download``; its ``CLIENT-CLI.md``)
against repositories it builds to be broken in every way the specification names. This
module answers them with exactly what a device runs, so the suite measures the agent and
not a stand-in:

* the fetcher is the agent's :class:`~otaguard.agent.fetcher.TlsFetcher` with the agent's
  default :class:`~otaguard.agent.config.FetchLimits` (timeouts, whole-request deadline,
  minimum rate, length caps);
* the session is the agent's :class:`~otaguard.agent.updater.TufSession`: python-tuf's
  ngclient with the device's ``UpdaterConfig`` (metadata size caps, root rotations), the
  hybrid policy gate in front of it, and the provisioned root as ngclient's bootstrap
  whatever the metadata cache holds;
* the provisioned root is checked as ``otaguard device init`` checks it: valid root
  metadata signed by a threshold of its own keys.

``init`` keeps the root it is given under ``provisioned/`` in the metadata directory:
a device keeps its trust anchor apart from ngclient's cache, and the suite reads every
``*.json`` at the top of the directory as trusted metadata.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal
from urllib.parse import quote

from otaguard._fs import atomic_write_bytes
from otaguard.agent.config import FetchLimits
from otaguard.agent.device import read_trust_file, validate_root
from otaguard.agent.fetcher import TlsFetcher
from otaguard.agent.updater import RepositoryUrls, TufSession
from otaguard.model.errors import DeviceStorageError, OperatorError
from otaguard.model.unsafe import Unsafe

__all__ = ["ANCHOR", "download", "init", "open_session", "refresh", "target_file"]

logger = logging.getLogger(__name__)

#: where ``init`` keeps the trusted root, relative to the metadata directory (a
#: subdirectory: the suite counts every top-level ``*.json`` as a trusted role)
ANCHOR: Final = Path("provisioned") / "root.json"


def init(*, metadata_dir: Path, trusted_root: Path) -> None:
    """Provision ``metadata_dir`` with ``trusted_root`` as its trust anchor; no network.

    Raises:
        ConfigError: the root is unreadable, not root metadata, or not signed by a
            threshold of its own keys.
        DeviceStorageError: the metadata directory cannot be written.
    """
    data = read_trust_file(trusted_root, "trusted root")
    version = validate_root(data, trusted_root).signed.version
    anchor = metadata_dir / ANCHOR
    try:
        anchor.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(anchor, data)
    except OSError as e:
        raise DeviceStorageError(f"cannot write the trust anchor {anchor}: {e.strerror}") from e
    logger.info("trusted root v%d provisioned in %s", version, anchor)


def open_session(
    *,
    metadata_dir: Path,
    urls: RepositoryUrls,
    tls: ssl.SSLContext | Literal[Unsafe.PLAIN_HTTP],
) -> TufSession:
    """The agent's session on ``urls``, bootstrapped from the anchor ``init`` provisioned.

    Args:
        metadata_dir: the directory ``init`` provisioned.
        urls: the repository's metadata and targets base URLs.
        tls: the context verifying the server, or ``Unsafe.PLAIN_HTTP`` (development
            only; warns).

    Raises:
        ConfigError: no anchor (run init), or it is not a valid self-signed root.
        VerificationError: the cached metadata cannot be loaded.
    """
    anchor = metadata_dir / ANCHOR
    # The device re-checks its anchor before every session (Device._session): a corrupt
    # trust anchor is the device's own configuration, refused before any request.
    trusted_root = read_trust_file(anchor, "trusted root (run init first)")
    validate_root(trusted_root, anchor)
    fetcher = TlsFetcher.from_limits(FetchLimits(), tls=tls, staging_dir=None)
    return TufSession(
        metadata_dir=metadata_dir, trusted_root=trusted_root, server_url=urls, fetcher=fetcher
    )


def refresh(session: TufSession) -> None:
    """The TUF client workflow for the top-level roles (root, timestamp, snapshot, targets).

    Raises:
        VerificationError, TransportError: as :meth:`TufSession.refresh`.
    """
    try:
        session.refresh()
    finally:
        session.fetcher.close()


def target_file(target_dir: Path, name: str) -> Path:
    """Where ``name`` is stored: one file directly in ``target_dir``, whatever the name.

    The name is percent-encoded as ngclient does (``/`` included), and a name of only
    dots (``.``, ``..``), which would name a directory, has its dots encoded too.
    """
    filename = quote(name, safe="")
    if filename.strip(".") == "":
        filename = filename.replace(".", "%2E")
    return target_dir / filename


def download(session: TufSession, names: Sequence[str], *, target_dir: Path) -> list[Path]:
    """Refresh, then download each of ``names`` in order into ``target_dir``.

    A target already there with the verified length and hashes is not downloaded again.
    The first failure stops the command.

    Returns:
        The files, in the order of ``names``.

    Raises:
        OperatorError: a name the verified metadata does not list.
        VerificationError: metadata or a target failed verification.
        TransportError: the repository could not be reached or misbehaved.
        DeviceStorageError: ``target_dir`` is full or unwritable.
    """
    files: list[Path] = []
    try:
        session.refresh()
        for name in names:
            target = session.find_target(name)
            if target is None:
                raise OperatorError(f"target {name!r} is not in the repository's verified metadata")
            dest = target_file(target_dir, name)
            if session.is_cached(target, dest):
                logger.info("%s: already downloaded and verified", name)
            else:
                session.download(target, dest)
            files.append(dest)
    finally:
        session.fetcher.close()
    return files
