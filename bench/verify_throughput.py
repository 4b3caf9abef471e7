"""Image verification throughput on the device, against ``openssl dgst -sha256``.

Measures the two hashing paths the agent runs over a whole image:

* ``TargetFile.verify_length_and_hashes(fileobj)``: what python-tuf's ngclient runs in
  ``download_target`` on the downloaded temp file before the image is accepted;
* ``FileSlots.digest(slot, length)``: otaguard's read-back of a written slot (also used
  by the simulated bootloader).

The reference is ``openssl dgst -sha256 FILE`` run as a subprocess on the same file in
the same run (process start-up included, a few ms). The page cache is warmed first and
each method takes the best of three runs, interleaved so drift hits all of them alike.

Target: the TargetFile path reaches at least 0.85 of openssl's throughput. The FileSlots
ratio is reported too. Exit 0 when the target is met, 1 otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from tuf.api.metadata import TargetFile

from otaguard.agent.slots import FileSlots
from otaguard.sim import make_image

IMAGE_BYTES: Final = 256 * 1024 * 1024
MIB: Final = 1024 * 1024
RUNS: Final = 3
TARGET_RATIO: Final = 0.85


def openssl_sha256(path: Path) -> str:
    """Hex digest from ``openssl dgst -sha256 FILE``."""
    out = subprocess.run(
        ["openssl", "dgst", "-sha256", str(path)], capture_output=True, text=True, check=True
    ).stdout
    # "SHA2-256(path)= <hex>" (OpenSSL 3) or "SHA256(path)= <hex>" (1.1)
    return out.rsplit("=", 1)[1].strip()


def warm(path: Path) -> None:
    """Read the file once so every method hashes from the page cache."""
    with open(path, "rb") as f:
        while f.read(4 * MIB):
            pass


def main() -> int:
    if shutil.which("openssl") is None:
        print("openssl is missing (make sysdeps)")
        return 1
    work = Path(tempfile.mkdtemp(prefix="otaguard-bench-verify-"))
    try:
        return run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path) -> int:
    slots = FileSlots(work)
    image = slots.path("A")  # the image doubles as slot A for FileSlots.digest
    t0 = time.perf_counter()
    make_image(image, size=IMAGE_BYTES, seed="bench-1.1.0")
    print(f"image: {IMAGE_BYTES // MIB} MiB written in {time.perf_counter() - t0:.2f} s ({image})")
    warm(image)

    expected = openssl_sha256(image)
    target = TargetFile(length=IMAGE_BYTES, hashes={"sha256": expected}, path="bench.img")

    def tuf_verify() -> None:
        # ngclient hands verify_length_and_hashes() the open temp file of the download.
        with open(image, "rb") as f:
            target.verify_length_and_hashes(f)

    def slot_digest() -> None:
        got = slots.digest("A", IMAGE_BYTES)
        if got != expected:
            raise AssertionError(f"FileSlots.digest gave {got}, openssl {expected}")

    def reference() -> None:
        openssl_sha256(image)

    methods: dict[str, Callable[[], None]] = {
        "openssl dgst -sha256": reference,
        "TargetFile.verify_length_and_hashes": tuf_verify,
        "FileSlots.digest": slot_digest,
    }
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(RUNS):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)

    mib = IMAGE_BYTES / MIB
    rates = {name: mib / secs for name, secs in best.items()}
    ref = rates["openssl dgst -sha256"]
    print(f"sha256 over {mib:.0f} MiB from the page cache, best of {RUNS}:")
    for name, rate in rates.items():
        print(f"  {name:<38} {rate:8.1f} MiB/s  {best[name]:.3f} s  ratio {rate / ref:.3f}")

    tuf_ratio = rates["TargetFile.verify_length_and_hashes"] / ref
    slot_ratio = rates["FileSlots.digest"] / ref
    ok = tuf_ratio >= TARGET_RATIO
    if slot_ratio < TARGET_RATIO:
        print(f"note: FileSlots.digest is below {TARGET_RATIO} of openssl (chunking in slots.py)")
    print(
        f"SUMMARY verify_throughput: {'PASS' if ok else 'FAIL'} "
        f"openssl={ref:.0f} MiB/s tuf={rates['TargetFile.verify_length_and_hashes']:.0f} MiB/s "
        f"(ratio {tuf_ratio:.2f}, target >= {TARGET_RATIO}) "
        f"slots={rates['FileSlots.digest']:.0f} MiB/s (ratio {slot_ratio:.2f})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
