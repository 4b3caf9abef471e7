"""Pure parts of the streaming install: the target check over a stream, progress pacing,
and the seam where a decompressor or delta applier sits between network and slot.

No I/O here: :class:`TargetStream` is fed bytes and raises python-tuf's own
``LengthOrHashMismatchError`` the moment the stream is longer than the verified target,
or at the end when its length or any of its hashes differ. It is what
``TargetFile.verify_length_and_hashes`` checks, done incrementally over the bytes as they
are written to the slot instead of over a staged copy (ADR 0017).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final, Protocol

from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import TargetFile

__all__ = [
    "PROGRESS_INTERVAL_S",
    "ProgressPacer",
    "StreamTransform",
    "TargetStream",
    "identity_transform",
]

#: progress is reported at most this often (plus once at the end): a 1 GiB image costs a
#: few hundred callbacks, not one per network read
PROGRESS_INTERVAL_S: Final = 0.25


class TargetStream:
    """Length cap and hashes of a python-tuf-verified ``TargetFile``, checked over a stream.

    Args:
        target: the target as python-tuf's ``get_targetinfo`` returned it (verified
            metadata): its ``length`` caps the stream, every entry of its ``hashes``
            must match at the end.

    Raises:
        LengthOrHashMismatchError: a hash algorithm hashlib does not know (as python-tuf).
    """

    def __init__(self, *, target: TargetFile) -> None:
        self.target = target
        #: bytes admitted under the length cap
        self.received = 0
        #: bytes hashed (equal to ``received`` once the stream is drained)
        self.hashed = 0
        self._hashers: dict[str, hashlib._Hash] = {}
        for algo in target.hashes:
            try:
                self._hashers[algo] = hashlib.new(algo)
            except ValueError as e:
                raise LengthOrHashMismatchError(f"Unsupported algorithm '{algo}'") from e

    def update(self, chunk: bytes | memoryview) -> None:
        """Account for the next bytes of the target: :meth:`admit`, then :meth:`digest`.

        Raises:
            LengthOrHashMismatchError: the stream is now longer than the target.
        """
        self.admit(len(chunk))
        self.digest(chunk)

    def admit(self, n: int) -> None:
        """Count ``n`` more bytes of the stream (the length cap; no hashing).

        Raises:
            LengthOrHashMismatchError: the stream is now longer than the target (endless
                data: refused before the excess is written anywhere).
        """
        if self.received + n > self.target.length:
            raise LengthOrHashMismatchError(
                f"{self.target.path}: more than the expected {self.target.length} bytes"
            )
        self.received += n

    def digest(self, chunk: bytes | memoryview) -> None:
        """Hash admitted bytes, in stream order (a pipeline may do it in another thread)."""
        self.hashed += len(chunk)
        for h in self._hashers.values():
            h.update(chunk)

    def sha256_so_far(self) -> str:
        """SHA-256 of the bytes seen so far (the resume checkpoint's prefix digest)."""
        h = self._hashers.get("sha256")
        if h is None:
            raise RuntimeError("the target lists no sha256")
        return h.copy().hexdigest()

    def finish(self) -> None:
        """Check the complete stream against the target.

        Raises:
            LengthOrHashMismatchError: shorter than the target, or a hash differs.
        """
        if self.received != self.target.length or self.hashed != self.received:
            raise LengthOrHashMismatchError(
                f"{self.target.path}: length {self.received} != expected {self.target.length}"
            )
        for algo, h in self._hashers.items():
            if not hmac.compare_digest(h.hexdigest(), self.target.hashes[algo]):
                raise LengthOrHashMismatchError(
                    f"{self.target.path}: {algo} hash does not match the verified target"
                )


class StreamTransform(Protocol):
    """What may sit between the verified network stream and the slot.

    Takes the target's verified chunks (already length-capped and hashed by
    :class:`TargetStream`) and yields the bytes to write to the slot, in order. A
    decompressor or a delta applier (reading its base from the active slot) implements
    this; it must bound its own output (the image length) and memory. ``resumable`` says
    whether slot offset equals stream offset, which an interrupted install needs to
    continue with an HTTP Range request instead of starting over.
    """

    resumable: bool

    def __call__(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Transform the verified stream into slot bytes."""
        ...


class _Identity:
    """The image is the target: slot bytes are the verified bytes (resumable)."""

    resumable = True

    def __call__(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        return iter(chunks)


#: the transform of a plain image target
identity_transform: Final[StreamTransform] = _Identity()


class ProgressPacer:
    """Reports bytes done to ``report(n)`` at most every :data:`PROGRESS_INTERVAL_S`.

    ``report`` receives the bytes done since its previous call (a progress bar advances
    by it), so the sum of all reports is the total streamed.

    Args:
        report: the progress display's callback.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self, report: Callable[[int], None], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._report = report
        self._clock = clock
        self._next = 0.0
        self._pending = 0
        self.calls = 0

    def __call__(self, n: int, *, final: bool = False) -> None:
        """Count ``n`` more bytes; report them if the interval passed (always when ``final``)."""
        self._pending += n
        now = self._clock()
        if self._pending and (final or now >= self._next):
            self._next = now + PROGRESS_INTERVAL_S
            self.calls += 1
            done, self._pending = self._pending, 0
            self._report(done)
