"""The streaming write: network -> (transform) -> slot, checked on the way, resumable.

One pass over the image: each chunk the fetcher hands over is counted and hashed against
the python-tuf-verified target (:class:`~otaguard.agent.stream.TargetStream`, refusing a
byte beyond its length before writing it), written to the slot, and every
``checkpoint_bytes`` the slot is fsynced and the checkpoint (bytes written, their SHA-256)
handed to the caller, which persists it in the install state. Resuming re-hashes the
slot's prefix, compares it with the checkpoint and asks the fetcher for the rest
(HTTP ``Range``); a prefix that does not match is discarded and the stream starts over.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from tuf.api import exceptions as tuf_exc
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import TargetFile

from otaguard.agent.fetcher import DownloadCancelledError
from otaguard.agent.slots import SlotBackend
from otaguard.agent.stream import StreamTransform, TargetStream, identity_transform
from otaguard.model.errors import DeviceStorageError, StopRequestedError

__all__ = [
    "MAX_RECONNECTS",
    "PIPELINE_DEPTH",
    "Checkpoint",
    "ImageCheck",
    "StreamStats",
    "stream_to_slot",
]

logger = logging.getLogger(__name__)

#: reconnections (Range requests) after a dropped connection within one install run;
#: each has its own deadline, so this also bounds how long a flaky server can hold us
MAX_RECONNECTS: Final = 3
#: chunks received but not yet hashed and written: the pipeline's memory (x 1 MiB reads)
PIPELINE_DEPTH: Final = 4


@dataclass(frozen=True)
class Checkpoint:
    """The slot holds ``written`` bytes of the target, fsynced, whose SHA-256 is ``sha256``."""

    written: int
    sha256: str


@dataclass(frozen=True)
class ImageCheck:
    """What a transformed stream must produce in the slot (length and SHA-256)."""

    length: int
    sha256: str


@dataclass
class StreamStats:
    """What one streaming run did (tests and benchmarks read it)."""

    resumed_at: int = 0
    downloaded: int = 0
    reconnects: int = 0
    prefix_rejected: bool = False


def _resume_point(
    backend: SlotBackend, slot: str, verifier: TargetStream, resume: Checkpoint | None
) -> int:
    """Feed the slot's checkpointed prefix to ``verifier``; the offset to continue from."""
    if resume is None or not 0 < resume.written <= verifier.target.length:
        return 0
    for chunk in backend.read(slot, resume.written):
        verifier.update(chunk)
    if verifier.received == resume.written and hmac.compare_digest(
        verifier.sha256_so_far(), resume.sha256
    ):
        logger.info("slot %s holds %d verified bytes: resuming there", slot, resume.written)
        return resume.written
    logger.warning("slot %s does not hold the checkpointed prefix: starting over", slot)
    return -1


def _decoded_resume_point(
    backend: SlotBackend, slot: str, image: ImageCheck, resume: Checkpoint | None
) -> int:
    """The slot offset a decoded (delta or compressed) stream may resume writing at.

    A decoder's state cannot be persisted (LZMA, zstd), so a decoded stream is fetched
    and decoded again from its first byte; what resumes is the slot: the checkpointed
    prefix, if the slot still holds it (re-hashed here), is not written again. The
    decoded bytes below the checkpoint are then compared with it (by hash) before the
    first byte beyond it is written.
    """
    if resume is None or not 0 < resume.written <= image.length:
        return 0
    h = hashlib.sha256()
    n = 0
    for chunk in backend.read(slot, resume.written):
        h.update(chunk)
        n += len(chunk)
    if n == resume.written and hmac.compare_digest(h.hexdigest(), resume.sha256):
        logger.info("slot %s holds %d checkpointed image bytes: writing from there", slot, n)
        return n
    logger.warning("slot %s does not hold the checkpointed prefix: starting over", slot)
    return -1


class _Sink:
    """The slot side of the stream, in a thread of its own: hash, write, checkpoint.

    The receiving thread decrypts the next chunk (``SSL_read`` releases the GIL) while
    this one hashes and writes the previous ones (``hashlib`` and ``os.write`` release it
    too), so a streamed install costs about the slower of network and disk, not their
    sum. The queue is bounded (:data:`PIPELINE_DEPTH`): memory stays a few MiB.
    """

    def __init__(
        self,
        step: Callable[[bytes], None],
    ) -> None:
        self._step = step
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=PIPELINE_DEPTH)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="otaguard-slot-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the receiving thread sees the error and stops
            try:
                self._step(chunk)
            except BaseException as e:  # noqa: BLE001 - handed to the receiving thread
                self.error = e

    def put(self, chunk: bytes) -> None:
        """Queue ``chunk``; raise what the sink failed with, if it failed."""
        self.check()
        self._queue.put(chunk)

    def check(self) -> None:
        """Raise the sink's error in the receiving thread."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Process what is queued, then stop the thread (it never outlives the stream)."""
        self._queue.put(None)
        self._thread.join()


class _Checkpointer:
    """Fsyncs the slot and persists checkpoints in a thread of its own.

    An fsync of a few MiB blocks for as long as the device takes to store them; done
    inline it would stall the stream at every checkpoint (measured here: 64 MiB written
    with an fsync every 8 MiB took twice as long as with one fsync at the end). A
    checkpoint records only bytes written before its fsync began, so it stays true while
    the stream goes on. The newest request wins; :meth:`close` persists the last one.
    """

    def __init__(self, sync: Callable[[], None], persist: Callable[[Checkpoint], None]) -> None:
        self._sync = sync
        self._persist = persist
        self._cv = threading.Condition()
        self._pending: Checkpoint | None = None
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="otaguard-checkpoint", daemon=True)
        self._thread.start()

    def request(self, ck: Checkpoint) -> None:
        """Checkpoint ``ck`` soon (replacing one not yet started); raise an earlier failure."""
        if self.error is not None:
            raise self.error
        with self._cv:
            self._pending = ck
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                ck, self._pending = self._pending, None
            if ck is None:
                return
            try:
                self._sync()  # durable first, then recorded
                self._persist(ck)
            except BaseException as e:  # noqa: BLE001 - handed to the streaming thread
                self.error = e
                return

    def close(self) -> None:
        """Persist the last requested checkpoint, then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()


def stream_to_slot(  # noqa: PLR0912, PLR0915 - one loop: reconnects, checks, checkpoints
    *,
    backend: SlotBackend,
    slot: str,
    target: TargetFile,
    open_stream: Callable[[int], Iterator[bytes]],
    resume: Checkpoint | None,
    checkpoint_bytes: int,
    on_checkpoint: Callable[[Checkpoint], None],
    stop: threading.Event,
    progress: Callable[[int], None] | None = None,
    transform: StreamTransform = identity_transform,
    image: ImageCheck | None = None,
    after_chunk: Callable[[int], None] | None = None,
) -> StreamStats:
    """Stream ``target`` into ``slot``; return once it is there, complete and fsynced.

    Args:
        backend: the slots.
        slot: the inactive slot (already invalid in the boot environment).
        target: the python-tuf-verified target: its length caps the stream, its hashes
            must all match.
        open_stream: ``open_stream(offset)`` yields the target's bytes from ``offset``
            (the fetcher seam: :meth:`Fetcher.stream_range`).
        resume: the last persisted checkpoint of this target in this slot, if any.
        checkpoint_bytes: fsync and checkpoint after this many bytes.
        on_checkpoint: persists a checkpoint (after the slot was fsynced up to it).
        stop: set when the agent must stop (the install resumes later).
        progress: called with byte counts as they are written.
        transform: decompressor or delta applier between the verified stream and the slot;
            the identity for a plain image. A decoded stream is fetched and decoded from
            its first byte again; with ``resume`` its slot prefix is not written again.
        image: the slot bytes a transform must produce (required with a transform).
        after_chunk: called with the stream offset after each chunk is written (fault
            injection).

    Raises:
        LengthOrHashMismatchError: the stream (or the transformed image) is longer than
            expected, or its length or a hash differs at the end.
        DownloadError: the network failed more than :data:`MAX_RECONNECTS` times.
        DeviceStorageError: the slot cannot be read, written or synced, or (a backend
            that reads back, :attr:`SlotBackend.read_back`) reads back differently from
            the image once written.
        StopRequestedError: ``stop`` was set.
    """
    plain = transform is identity_transform
    if not plain and image is None:
        raise ValueError("a transformed stream needs the image's length and hash")
    stats = StreamStats()
    verifier = TargetStream(target=target)
    if plain:
        start = _resume_point(backend, slot, verifier, resume)
    else:
        assert image is not None  # noqa: S101 - checked above
        start = _decoded_resume_point(backend, slot, image, resume)
    if start < 0:
        stats.prefix_rejected, start = True, 0
        verifier = TargetStream(target=target)
    stats.resumed_at = start
    image_hash = hashlib.sha256()
    produced = 0  # bytes the transform produced (checked against the image length)
    written = last = start  # slot bytes written / at the last checkpoint
    pos = start if plain else 0  # stream bytes received
    writer = backend.open_writer(
        slot, offset=start, length=image.length if image else target.length
    )

    def skip_prefix(out: bytes) -> bytes:
        """Hash decoded bytes the slot already holds; return those it does not."""
        keep = produced - start  # ``produced`` already counts ``out``
        if keep >= len(out):
            return out
        head = out[: len(out) - max(keep, 0)]
        image_hash.update(head)
        if keep >= 0 and not hmac.compare_digest(
            image_hash.hexdigest(), resume.sha256 if resume else ""
        ):
            raise LengthOrHashMismatchError(
                f"{target.path}: decodes to another prefix than the slot's checkpoint"
            )
        return out[len(head) :]

    def sink_step(out: bytes) -> None:
        nonlocal written, last
        if plain:
            verifier.digest(out)  # slot bytes are the stream's bytes
        else:
            image_hash.update(out)
        writer.write(out)
        written += len(out)
        if progress is not None:
            progress(len(out))
        if written - last >= checkpoint_bytes:
            digest = verifier.sha256_so_far() if plain else image_hash.copy().hexdigest()
            checkpoints.request(Checkpoint(written, digest))
            last = written
        if after_chunk is not None:
            after_chunk(written)

    def received(offset: int) -> Iterator[bytes]:
        nonlocal pos
        for chunk in open_stream(offset):
            if plain:
                verifier.admit(len(chunk))  # refuses a byte beyond the target up front
            else:
                verifier.update(chunk)
            pos += len(chunk)
            stats.downloaded += len(chunk)
            yield chunk

    checkpoints = _Checkpointer(writer.sync, on_checkpoint)
    sink = _Sink(sink_step)
    try:
        try:
            # A run killed after its last checkpoint covered the whole target has nothing
            # left to fetch (a Range beyond the end would be refused with 416).
            while pos < target.length or not plain:
                try:
                    for decoded in transform(received(pos)):
                        out = decoded
                        if not plain:
                            assert image is not None  # noqa: S101 - checked above
                            produced += len(out)
                            if produced > image.length:
                                raise LengthOrHashMismatchError(
                                    f"{target.path} expands beyond the image's {image.length} bytes"
                                )
                            if produced - len(out) < start:
                                out = skip_prefix(out)  # the slot holds these already
                                if not out:
                                    continue
                        sink.put(out)
                        if stop.is_set():
                            raise StopRequestedError(f"stopped while writing slot {slot}")
                    break
                except tuf_exc.DownloadError as e:
                    resumable = plain and not isinstance(
                        e,
                        tuf_exc.DownloadHTTPError
                        | tuf_exc.DownloadLengthMismatchError
                        | DownloadCancelledError,
                    )
                    if not resumable or stats.reconnects >= MAX_RECONNECTS or stop.is_set():
                        raise
                    stats.reconnects += 1
                    logger.warning("%s; continuing from byte %d (Range request)", e, pos)
        finally:
            sink.close()  # what was received is written; the thread ends here
            checkpoints.close()
            if sink.error is not None and not isinstance(sink.error, Exception):
                # An interrupt of the writing thread (a stop of the process) wins over
                # whatever the decoder ran into meanwhile: it must not become a fallback.
                raise sink.error
        sink.check()
        if checkpoints.error is not None:
            raise checkpoints.error
        verifier.finish()
        if not plain:
            assert image is not None  # noqa: S101 - checked above
            if produced != image.length or not hmac.compare_digest(
                image_hash.hexdigest(), image.sha256
            ):
                raise LengthOrHashMismatchError(
                    f"{target.path}: the image written does not match the verified image"
                )
        writer.sync()
    finally:
        writer.close()
    if backend.read_back:
        _read_back(backend, slot, image or ImageCheck(target.length, target.hashes["sha256"]))
    return stats


def _read_back(backend: SlotBackend, slot: str, image: ImageCheck) -> None:
    """Read the slot back from storage and compare it with the image (after close).

    The stream's hash covers the bytes handed to the device; this covers what the device
    stored (a block device's writer drops its page cache on close and the read bypasses
    it), so a medium that loses or corrupts writes is caught before the slot is armed.

    Raises:
        DeviceStorageError: the slot reads back differently.
    """
    if not hmac.compare_digest(backend.digest(slot, image.length), image.sha256):
        raise DeviceStorageError(
            f"slot {slot} reads back differently from the image written to it (storage fault)"
        )
