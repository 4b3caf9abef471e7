"""Uptane full verification of the director's instruction (pure: bytes in, decision out).

The director (an online server key) tells the device which image to install; the image
repository (offline keys) says which images exist. The device installs an image only if
both agree, so a stolen director key can choose among images the offline keys signed,
and nothing else. Every input is passed in: the trusted director root, the nonce the
device just sent, its serial and hardware id, the reference time.

Checks, in order (Uptane standard 5.4.4.2 "full verification", director part, with the
check-in nonce in place of the director's timestamp and snapshot):

1. the director root chain: each new root version signed by a threshold of the previous
   root's keys and of its own (python-tuf's ``TrustedMetadataSet.update_root``), meeting
   both roots' hybrid policy (ADR 0014), the newest unexpired;
2. the instruction parses as TUF ``targets`` metadata of bounded size;
3. it is signed by a threshold of the director root's ``targets`` keys
   (``Root.verify_delegate``);
4. it is unexpired at the reference time;
5. its signed ``custom`` binding names this device's serial and **the nonce of the
   manifest just sent**: an old instruction, or another device's, is refused;
6. it names at most :data:`MAX_DIRECTOR_TARGETS` target, for this hardware id;
7. (:func:`match_image_repository`) the image repository's verified targets list the same
   name with identical length and hashes, for this hardware id.

The version and security-counter checks against what runs and the anti-rollback floor
follow in :func:`otaguard.agent.updater.select_update`, given the one matched offer.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from securesystemslib.exceptions import FormatError
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError, SerializationError
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from otaguard.agent.updater import Offer
from otaguard.crypto.hybrid import check_root_update
from otaguard.model.director import (
    DIRECTOR_BINDING_KEY,
    MAX_DIRECTOR_ROOT_BYTES,
    MAX_DIRECTOR_TARGETS,
    MAX_DIRECTOR_TARGETS_BYTES,
)
from otaguard.model.errors import (
    DirectorMetadataError,
    DirectorMismatchError,
    VerificationError,
)
from otaguard.model.limits import MAX_ROOT_ROTATIONS
from otaguard.model.release import ReleaseInfo

__all__ = [
    "DirectorInstruction",
    "follow_director_root",
    "match_image_repository",
    "verify_director_targets",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DirectorInstruction:
    """A verified director answer: install ``target``, or nothing when it is ``None``."""

    target: TargetFile | None
    version: int


def follow_director_root(
    trusted: bytes,
    fetch_next: Callable[[int], bytes | None],
    *,
    now: dt.datetime,
) -> tuple[bytes, Root]:
    """Follow director root rotations from the trusted root, as ngclient does for TUF's.

    Args:
        trusted: the device's trusted director root (exact bytes).
        fetch_next: returns the bytes of root version ``N`` or ``None`` when there is none
            (the caller's network seam; bounded by :data:`MAX_DIRECTOR_ROOT_BYTES`).
        now: reference time.

    Returns:
        The newest verified root's bytes (to persist when they changed) and the root.

    Raises:
        DirectorMetadataError: a new root is not signed by both the old and the new
            threshold, rolls back, or the newest is expired.
    """
    try:
        tms = TrustedMetadataSet(trusted, EnvelopeType.METADATA)
        data = trusted
        for _ in range(MAX_ROOT_ROTATIONS):
            nxt = fetch_next(tms.root.version + 1)
            if nxt is None:
                break
            if len(nxt) > MAX_DIRECTOR_ROOT_BYTES:
                raise DirectorMetadataError(
                    f"director root version {tms.root.version + 1} too large"
                )
            # the hybrid policy of the old root and of the new one, then TUF's thresholds
            check_root_update(tms.root, nxt, what=f"director root v{tms.root.version + 1}")
            tms.update_root(nxt)
            data = nxt
            logger.info("director root rotated to version %d", tms.root.version)
    except tuf_exc.RepositoryError as e:
        raise DirectorMetadataError(f"director root: {type(e).__name__}: {e}") from e
    except DirectorMetadataError:
        raise
    except VerificationError as e:  # the hybrid policy (HybridPolicyError) or not a root
        raise DirectorMetadataError(f"director root: {e}") from e
    except (DeserializationError, ValueError) as e:
        raise DirectorMetadataError(f"director root: not valid root metadata: {e}") from e
    root = tms.root
    if root.is_expired(now):
        raise DirectorMetadataError(f"director root version {root.version} expired {root.expires}")
    return data, root


def verify_director_targets(
    data: bytes,
    *,
    root: Root,
    serial: str,
    hardware_id: str,
    nonce: str,
    now: dt.datetime,
) -> DirectorInstruction:
    """Verify the director's instruction for this check-in (steps 2 to 6 above).

    Raises:
        DirectorMetadataError: malformed, not signed by the director's targets keys,
            expired, for another nonce or device, or naming more than one image or
            another hardware id.
    """
    if len(data) > MAX_DIRECTOR_TARGETS_BYTES:
        raise DirectorMetadataError(
            f"director instruction exceeds {MAX_DIRECTOR_TARGETS_BYTES} bytes"
        )
    try:
        md = Metadata[Targets].from_bytes(data)
    except (DeserializationError, ValueError, TypeError, KeyError) as e:
        raise DirectorMetadataError(f"director instruction is not TUF targets metadata: {e}") from e
    if not isinstance(md.signed, Targets):
        raise DirectorMetadataError("director instruction is not targets metadata")
    try:
        root.verify_delegate(Targets.type, md.signed_bytes, md.signatures)
    except (tuf_exc.UnsignedMetadataError, FormatError, ValueError, SerializationError) as e:
        # SerializationError: no canonical form (a float in "signed"; found by tests/fuzz)
        raise DirectorMetadataError(
            "director instruction is not signed by a threshold of the director's targets keys"
        ) from e
    targets = md.signed
    if targets.is_expired(now):
        raise DirectorMetadataError(f"director instruction expired at {targets.expires}")
    custom = targets.unrecognized_fields.get("custom")
    binding = custom.get(DIRECTOR_BINDING_KEY) if isinstance(custom, dict) else None
    if not isinstance(binding, dict) or binding.get("serial") != serial:
        raise DirectorMetadataError("director instruction is not for this device")
    if binding.get("nonce") != nonce:
        raise DirectorMetadataError(
            "director instruction answers another check-in (nonce differs): replayed or stale"
        )
    if targets.delegations is not None or len(targets.targets) > MAX_DIRECTOR_TARGETS:
        raise DirectorMetadataError(
            f"director instruction names more than {MAX_DIRECTOR_TARGETS} image or delegates"
        )
    target = next(iter(targets.targets.values()), None)
    if target is not None:
        tcustom = target.unrecognized_fields.get("custom")
        if not isinstance(tcustom, dict) or tcustom.get("hardware_id") != hardware_id:
            raise DirectorMetadataError(
                f"director instruction for {target.path} is for another hardware id"
            )
    return DirectorInstruction(target=target, version=targets.version)


def match_image_repository(
    instruction: TargetFile, image_target: TargetFile | None, *, hardware_id: str
) -> Offer:
    """Step 7: the image repository must list the director's target identically.

    Args:
        instruction: the target the verified director instruction names.
        image_target: the image repository's (ngclient-verified) target of the same name,
            ``None`` when it lists none.
        hardware_id: this device's hardware id.

    Returns:
        The image repository's offer, for the version and counter checks.

    Raises:
        DirectorMismatchError: absent, or another length, hashes or hardware id.
    """
    name = instruction.path
    if image_target is None:
        raise DirectorMismatchError(f"director names {name}, which the image repository lacks")
    if image_target.length != instruction.length:
        raise DirectorMismatchError(
            f"director gives {name} {instruction.length} bytes, the image repository "
            f"{image_target.length}"
        )
    # Identical hashes: every algorithm either names, with equal digests, and sha256 present.
    if instruction.hashes != image_target.hashes or "sha256" not in instruction.hashes:
        raise DirectorMismatchError(f"director and image repository hashes of {name} differ")
    try:
        info = ReleaseInfo.from_custom(image_target.unrecognized_fields.get("custom"))
    except VerificationError as e:
        raise DirectorMismatchError(f"image repository entry {name}: {e}") from e
    if hardware_id not in info.hardware_ids:
        raise DirectorMismatchError(
            f"{name} is not for hardware {hardware_id} in the image repository"
        )
    if info.sbom is None:
        raise DirectorMismatchError(
            f"image repository entry {name} carries no SBOM binding; every release needs one"
        )
    return Offer(image_target, info)
