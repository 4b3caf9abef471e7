"""TPM backend of the anti-rollback floor: two TPM 2.0 NV counters (tpm2-pytss, ESAPI).

What the TPM holds, and why this way:

* **The security counter** -- the rollback index a bootloader compares (AVB's
  ``rollback_index``, U-Boot FIT's ``rollback``) -- is an NV index of type
  ``TPM_NT_COUNTER``. The TPM itself refuses anything but ``TPM2_NV_Increment`` on it, so
  no software, however privileged, can lower it, and it survives a TPM restart. Its
  floor is ``counter - 1``: the first increment (at provisioning) makes an unwritten
  counter readable with value 1 on a TPM that never deleted a counter.

* **The version** rides in a second ``TPM_NT_COUNTER``. A counter can only step by one
  per TPM command, so an exact ``major<<40 | minor<<20 | patch`` encoding would cost a
  million increments per minor release (and as many NV writes). The encoding is instead
  :func:`encode_version`, monotone but lossy: ``(major * 16 + minor') * 16 + patch'``,
  where a minor of 15 or more counts as 15 (and then the patch as 0) and a patch of 15 or
  more counts as 15. A patch release costs at most one increment, a minor release at
  most 16, a major release 256; pre-release tags are ignored (``1.2.0-rc.1`` and
  ``1.2.0`` encode alike), which keeps the map monotone: every version strictly below
  the decoded bound (:func:`decode_version`, the lowest version with that code) has a
  smaller code, so the TPM refuses exactly those. NV "bits" indices were considered:
  OR-ing bits is monotone too, but a chain of 64-bit sets has at most 65 elements.

* **Precision** comes from the device's ``monotonic.json`` (the file backend), written
  after the TPM: the floor read is the componentwise maximum of the file and the TPM.
  Rewriting or deleting the file therefore cannot take the floor below the TPM's
  values; it can only lose precision inside a TPM code (a patch above 15, a
  pre-release), which the exact security counter -- raised by every security release --
  bounds.

Threat left open: the indices are owner-authorised (``TPMA_NV_OWNERWRITE``). Whoever
holds the owner hierarchy's authorisation (empty on many Linux systems) can increment
them, which can only *raise* the floor (a denial of service: updates refused until
releases catch up), never lower it. Undefining and redefining an index does not lower it
either: a new counter starts above the highest value any deleted counter reached, and an
index redefined as another type (an ordinary index one could write low) is refused on
read. A production device sets an owner password or, better, gives the indices a policy
bound to the agent (``TPMA_NV_POLICYWRITE``) -- later work, with the device key.

``tpm2_pytss`` is imported here only, so the agent runs without it (extra ``tpm``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from otaguard.agent.monotonic import FileMonotonicStore, Floor, MonotonicStore
from otaguard.model.errors import ConfigError, DeviceStorageError, DowngradeError
from otaguard.model.version import Version

if TYPE_CHECKING:
    from tpm2_pytss import ESAPI

__all__ = [
    "DEFAULT_SECURITY_INDEX",
    "DEFAULT_VERSION_INDEX",
    "MAX_INCREMENTS_PER_RAISE",
    "TpmMonotonicStore",
    "decode_version",
    "encode_version",
]

logger = logging.getLogger(__name__)

#: NV index of the security counter, in the 0x015xxxxx part of the NV handle space, away
#: from the ranges the TCG handle registry reserves for TPM and platform manufacturers
#: (EK certificates and the like); both indices are constructor arguments if they collide.
DEFAULT_SECURITY_INDEX: Final = 0x01500A10
#: NV index of the version counter.
DEFAULT_VERSION_INDEX: Final = 0x01500A11

#: Each increment is one TPM command and one NV write (~1 ms on swtpm, tens of ms and NV
#: wear on a discrete TPM). A raise needing more is refused as absurd: a security
#: counter jumping by thousands is a publishing mistake or an attack, and 4096 covers a
#: factory floor up to major version 15 (256 increments per major).
MAX_INCREMENTS_PER_RAISE: Final = 4096

#: Minor and patch values at or above this share one code (see the module docstring):
#: 16 keeps a major release at 256 increments.
_VERSION_FIELD_CAP: Final = 15
_VERSION_RADIX: Final = _VERSION_FIELD_CAP + 1
#: An unwritten counter becomes 1 on its first increment (no counter ever deleted).
_COUNTER_ORIGIN: Final = 1
_COUNTER_BYTES: Final = 8


def encode_version(version: Version) -> int:
    """The monotone, lossy code of ``version`` held in the version counter.

    ``v1 <= v2`` implies ``encode_version(v1) <= encode_version(v2)``.
    """
    if version.minor >= _VERSION_FIELD_CAP:
        minor, patch = _VERSION_FIELD_CAP, 0
    else:
        minor, patch = version.minor, min(version.patch, _VERSION_FIELD_CAP)
    return (version.major * _VERSION_RADIX + minor) * _VERSION_RADIX + patch


def decode_version(code: int) -> Version:
    """The lowest version whose code is ``code`` (its lowest pre-release, ``-0``)."""
    major, rest = divmod(code, _VERSION_RADIX * _VERSION_RADIX)
    minor, patch = divmod(rest, _VERSION_RADIX)
    return Version(major, minor, patch, ("0",))


_T = TypeVar("_T")


class TpmMonotonicStore(MonotonicStore):
    """The anti-rollback floor in two TPM NV counters, with the file for precision."""

    def __init__(
        self,
        tcti: str,
        file_path: Path,
        *,
        security_index: int = DEFAULT_SECURITY_INDEX,
        version_index: int = DEFAULT_VERSION_INDEX,
    ):
        """Use the TPM reached through ``tcti``.

        Args:
            tcti: a TCTI string, e.g. ``device:/dev/tpmrm0`` or
                ``swtpm:host=127.0.0.1,port=2321``.
            file_path: the file store kept beside the TPM for the exact version.
            security_index: NV index of the security counter.
            version_index: NV index of the version counter.
        """
        self.tcti = tcti
        self.file = FileMonotonicStore(file_path)
        self.security_index = security_index
        self.version_index = version_index

    # -- TPM access ------------------------------------------------------------------
    @contextmanager
    def _esapi(self) -> Iterator[ESAPI]:
        """One connection per operation: nothing stale survives a TPM restart."""
        try:
            from tpm2_pytss import ESAPI
            from tpm2_pytss.TSS2_Exception import TSS2_Exception
        except ImportError as e:
            raise ConfigError(
                "the TPM anti-rollback store needs tpm2-pytss (pip install 'otaguard[tpm]')"
            ) from e
        try:
            ctx = ESAPI(self.tcti)
        except TSS2_Exception as e:
            raise DeviceStorageError(f"cannot reach the TPM at {self.tcti!r}: {e}") from e
        try:
            yield ctx
        finally:
            ctx.close()

    def _call(self, what: str, index: int, op: Callable[[ESAPI], _T]) -> _T:
        """Run ``op`` and translate tpm2-pytss errors into otaguard's."""
        from tpm2_pytss.constants import TPM2_RC
        from tpm2_pytss.TSS2_Exception import TSS2_Exception

        with self._esapi() as ctx:
            try:
                return op(ctx)
            except TSS2_Exception as e:
                if e.error in (TPM2_RC.HANDLE, TPM2_RC.NV_UNINITIALIZED):
                    raise ConfigError(
                        f"TPM NV index {index:#x} ({what}) is not provisioned: {e}"
                    ) from e
                raise DeviceStorageError(f"TPM {what} at index {index:#x} failed: {e}") from e

    def _read_counter(self, index: int, what: str) -> int:
        from tpm2_pytss.constants import ESYS_TR, TPM2_NT, TPMA_NV

        def op(ctx: ESAPI) -> int:
            handle = ctx.tr_from_tpmpublic(index)
            public, _name = ctx.nv_read_public(handle)
            attrs = int(public.nvPublic.attributes)
            nt = (attrs & TPMA_NV.TPM2_NT_MASK) >> TPMA_NV.TPM2_NT_SHIFT
            # An ordinary index could be written low: only a hardware counter counts.
            if nt != TPM2_NT.COUNTER:
                raise ConfigError(f"TPM NV index {index:#x} ({what}) is not an NV counter")
            data = ctx.nv_read(handle, _COUNTER_BYTES, 0, auth_handle=ESYS_TR.RH_OWNER)
            return int.from_bytes(bytes(data), "big") - _COUNTER_ORIGIN

        return self._call(f"read of the {what}", index, op)

    def _increment(self, index: int, what: str, times: int) -> None:
        from tpm2_pytss.constants import ESYS_TR

        def op(ctx: ESAPI) -> None:
            handle = ctx.tr_from_tpmpublic(index)
            for _ in range(times):
                ctx.nv_increment(handle, auth_handle=ESYS_TR.RH_OWNER)

        self._call(f"increment of the {what}", index, op)

    def _define(self, index: int, what: str) -> None:
        """Define ``index`` as an owner-authorised counter, if it is not yet defined."""
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_NT, TPM2_RC, TPMA_NV
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

        attributes = (
            TPMA_NV.OWNERWRITE
            | TPMA_NV.OWNERREAD
            | TPMA_NV.NO_DA
            | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)
        )
        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=index,
                nameAlg=TPM2_ALG.SHA256,
                attributes=attributes,
                dataSize=_COUNTER_BYTES,
            )
        )

        def op(ctx: ESAPI) -> None:
            try:
                ctx.nv_define_space(None, public, auth_handle=ESYS_TR.RH_OWNER)
            except TSS2_Exception as e:
                if e.error != TPM2_RC.NV_DEFINED:
                    raise
                # Re-provisioning on the same TPM: the existing counter is kept (its
                # type is checked on read); it can only have moved up.
            handle = ctx.tr_from_tpmpublic(index)
            existing, _name = ctx.nv_read_public(handle)
            # Make it readable: an unwritten counter has no value yet (also after a
            # provisioning cut short between definition and first increment).
            if not int(existing.nvPublic.attributes) & TPMA_NV.WRITTEN:
                ctx.nv_increment(handle, auth_handle=ESYS_TR.RH_OWNER)

        self._call(f"definition of the {what}", index, op)

    # -- the MonotonicStore interface -----------------------------------------------------
    def read_tpm(self) -> tuple[Version, int]:
        """The TPM's own lower bound: (decoded version, security counter).

        Raises:
            ConfigError: an index is undefined, unwritten or not a counter.
            DeviceStorageError: the TPM cannot be reached or failed.
        """
        counter = self._read_counter(self.security_index, "security counter")
        code = self._read_counter(self.version_index, "version counter")
        return decode_version(code), counter

    def read(self) -> Floor:
        """The floor: the TPM's values, made exact by the file where it agrees.

        A file below the TPM (rewritten or restored from a backup) is overridden; a
        missing or corrupt file leaves the TPM's lower bound alone.
        """
        version, counter = self.read_tpm()
        try:
            recorded = self.file.read()
        except ConfigError as e:
            logger.warning("%s; using the TPM's anti-rollback floor alone", e)
            return Floor(version, counter)
        if recorded.version < version or recorded.security_counter < counter:
            logger.warning(
                "anti-rollback file %s is below the TPM (%s, %d); the TPM holds",
                self.file.path,
                version,
                counter,
            )
        return Floor(max(recorded.version, version), max(recorded.security_counter, counter))

    def raise_to(self, version: Version, security_counter: int) -> None:
        """Raise the TPM counters (first) and the file to the given floor; never lower.

        Raises:
            DowngradeError: either value is below the current floor.
            ConfigError: the raise needs more than :data:`MAX_INCREMENTS_PER_RAISE`
                increments of one counter, or the TPM's indices are not provisioned.
            DeviceStorageError: the TPM cannot be reached or failed.
        """
        self.read().check(version, security_counter)
        self._write(Floor(version, security_counter))

    def _write(self, floor: Floor) -> None:
        version_now, counter_now = self.read_tpm()
        steps = {
            "security counter": (self.security_index, floor.security_counter - counter_now),
            "version counter": (
                self.version_index,
                encode_version(floor.version) - encode_version(version_now),
            ),
        }
        for what, (_index, step) in steps.items():
            # The TPM cannot go down; saying so beats a silent no-op.
            if step < 0:
                raise DowngradeError(f"the TPM {what} is above the requested floor")
            if step > MAX_INCREMENTS_PER_RAISE:
                raise ConfigError(
                    f"raising the TPM {what} needs {step} increments "
                    f"(more than {MAX_INCREMENTS_PER_RAISE}); refused as absurd"
                )
        for what, (index, step) in steps.items():
            if step:
                self._increment(index, what, step)
        # After the TPM: a power cut in between leaves the file below the TPM, which
        # read() overrides and the next raise_to rewrites.
        self.file._write(floor)

    @classmethod
    def provision(
        cls,
        tcti: str,
        file_path: Path,
        floor: Floor,
        *,
        security_index: int = DEFAULT_SECURITY_INDEX,
        version_index: int = DEFAULT_VERSION_INDEX,
    ) -> TpmMonotonicStore:
        """Create the counters at the factory and raise them to ``floor``.

        Raises:
            ConfigError: the TPM's counters already stand above ``floor`` (a TPM with
                counter history, or a device provisioned with a newer floor before).
            DeviceStorageError: the TPM cannot be reached or failed.
        """
        store = cls(tcti, file_path, security_index=security_index, version_index=version_index)
        store._define(security_index, "security counter")
        store._define(version_index, "version counter")
        try:
            store._write(floor)
        except DowngradeError as e:
            raise ConfigError(f"cannot provision the TPM floor at {floor}: {e}") from e
        return store
