"""Delta size and apply cost on real consecutive Debian security updates (ADR 0018).

Pairs, all from the Debian archive through ``apt-get download`` (bookworm, then
bookworm-security):

- ``libcrypto.so.3`` of libssl3 3.0.17-1~deb12u2 -> 3.0.20-1~deb12u2 and
  3.0.20-1~deb12u2 -> 3.0.22-1~deb12u2;
- a 128 MiB ext4 root filesystem made with ``mke2fs -d`` from the libssl3 + openssl
  package tree of the old and the new version (fixed UUID, hash seed and time, so only
  the packages differ).

For each pair, in the same run: otaguard's delta (detools sequential bsdiff, lzma), the
bsdiff reference (``bsdiff4``, BSDIFF40, bzip2) and the full image compressed with
otaguard's zstd settings; sizes as a share of the new image, build times, and the apply
time and peak RSS (VmHWM of a child process that does only the apply, interpreter and
imports included) of otaguard's applier against bsdiff4's.

Acceptance (exit 0 only if all hold): on every pair otaguard's delta is no larger than
bsdiff's (where bsdiff4 finishes at all) and never larger than the full zstd image, and
it is applied in <= 32 MiB RSS.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from otaguard.delta.build import compress_zstd

MIB: Final = 1024 * 1024
ROOTFS_BYTES: Final = 128 * MIB
MAX_APPLY_RSS_MIB: Final = 32.0
#: bsdiff4 holds both files and its suffix arrays in memory; past this it is stopped
BSDIFF_TIMEOUT_S: Final = 600.0
BSDIFF_MEMORY_LIMIT: Final = 4 * 1024 * MIB
#: otaguard's build of one delta; past this the pair is reported as failed
BUILD_TIMEOUT_S: Final = 1800.0
VERSIONS: Final = ("3.0.17-1~deb12u2", "3.0.20-1~deb12u2", "3.0.22-1~deb12u2")
PACKAGES: Final = ("libssl3", "openssl")
LIBCRYPTO: Final = "usr/lib/x86_64-linux-gnu/libcrypto.so.3"
FS_UUID: Final = "6f0a0b5e-1c2d-4e3f-8a9b-0c1d2e3f4a5b"

# The child reports its own peak RSS (VmHWM of its address space since exec). ru_maxrss
# from wait4 is not used: Linux carries the forking parent's peak into the child's.
_HWM: Final = """
def _hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""
_APPLY_OTAGUARD: Final = (
    _HWM
    + """
import hashlib, sys
from otaguard.delta import apply_delta
base, delta, length = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = hashlib.sha256()
with open(base, "rb") as b, open(delta, "rb") as d, open(sys.argv[4], "wb") as out:
    def write(data):
        h.update(data)
        out.write(data)
    apply_delta(iter(lambda: d.read(256 * 1024), b""), base=b, base_length=int(sys.argv[5]),
                image_length=length, write=write)
print(h.hexdigest(), _hwm_kib())
"""
)
_APPLY_BSDIFF: Final = (
    _HWM
    + """
import hashlib, sys
import bsdiff4
bsdiff4.file_patch(sys.argv[1], sys.argv[4], sys.argv[2])
print(hashlib.sha256(open(sys.argv[4], "rb").read()).hexdigest(), _hwm_kib())
"""
)
_BUILD_OTAGUARD: Final = """
import sys
from pathlib import Path
from otaguard.delta.build import build_delta
build_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
"""
_DIFF_BSDIFF: Final = """
import sys
import bsdiff4
bsdiff4.file_diff(sys.argv[1], sys.argv[2], sys.argv[3])
"""


@dataclass
class Row:
    """One pair's figures."""

    name: str
    new_bytes: int
    ours: int
    ours_build_s: float
    ours_apply_s: float
    ours_rss_mib: float
    zstd: int
    bsdiff: int | None
    bsdiff_build_s: float | None
    bsdiff_apply_s: float | None
    bsdiff_rss_mib: float | None
    bsdiff_note: str = ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def _child(
    code: str, args: list[str], *, limit_as: int | None = None, timeout: float
) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter: (seconds, stdout)."""

    def pre() -> None:
        if limit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            preexec_fn=pre,  # noqa: PLW1509 - only setrlimit, before exec
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, _ = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        why = "killed after the time limit" if elapsed >= timeout else (lines[-1:] or ["?"])[0]
        raise RuntimeError(f"exit {proc.returncode}: {why[:160]}")
    return elapsed, out.decode().strip()


def _download(work: Path) -> dict[str, Path]:
    """The package trees, one per version (apt-get download, dpkg-deb -x)."""
    debs = work / "debs"
    debs.mkdir()
    specs = [f"{p}={v}" for v in VERSIONS for p in PACKAGES]
    run = subprocess.run(
        ["apt-get", "download", *specs],
        cwd=debs,
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        sys.exit(f"apt-get download {' '.join(specs)} failed: {run.stderr.strip()[-300:]}")
    trees = {}
    for v in VERSIONS:
        tree = work / f"tree-{v}"
        for p in PACKAGES:
            (deb,) = debs.glob(f"{p}_{v.replace(':', '%3a')}_*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        trees[v] = tree
    return trees


def _rootfs(tree: Path, out: Path) -> Path:
    """A 128 MiB ext4 image of ``tree``, reproducible apart from the tree's content."""
    with open(out, "wb") as f:
        f.truncate(ROOTFS_BYTES)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-U", FS_UUID,
         "-E", f"hash_seed={FS_UUID},root_owner=0:0", "-d", str(tree), str(out)],
        check=True, env=env,
    )  # fmt: skip
    return out


def _measure(name: str, old: Path, new: Path, work: Path) -> Row:
    d = work / name
    d.mkdir()
    want = _sha256(new)
    ours, zst, bs = d / "ours.delta", d / "full.zst", d / "bsdiff"
    # in a child with a time limit: bsdiff's match search can crawl on long zero runs
    ours_build, _ = _child(_BUILD_OTAGUARD, [str(old), str(new), str(ours)],
                           timeout=BUILD_TIMEOUT_S)  # fmt: skip
    compress_zstd(new, zst)
    apply_s, got = _child(
        _APPLY_OTAGUARD,
        [str(old), str(ours), str(new.stat().st_size), str(d / "out"), str(old.stat().st_size)],
        timeout=600,
    )
    got, hwm = got.split()
    rss = int(hwm) / 1024
    if got != want:
        sys.exit(f"{name}: otaguard's delta did not rebuild the image")
    row = Row(name, new.stat().st_size, ours.stat().st_size, ours_build, apply_s, rss,
              zst.stat().st_size, None, None, None, None)  # fmt: skip
    try:
        t = time.perf_counter()
        _child(_DIFF_BSDIFF, [str(old), str(new), str(bs)],
               limit_as=BSDIFF_MEMORY_LIMIT, timeout=BSDIFF_TIMEOUT_S)  # fmt: skip
        row.bsdiff_build_s = time.perf_counter() - t
        row.bsdiff = bs.stat().st_size
        b_apply, b_out = _child(
            _APPLY_BSDIFF, [str(old), str(bs), "", str(d / "out-bsdiff")], timeout=600
        )
        b_got, b_hwm = b_out.split()
        b_rss = int(b_hwm) / 1024
        if b_got != want:
            sys.exit(f"{name}: bsdiff4's patch did not rebuild the image")
        row.bsdiff_apply_s, row.bsdiff_rss_mib = b_apply, b_rss
    except RuntimeError as e:
        row.bsdiff_note = f"bsdiff4 failed: {e}"
    return row


def _pct(n: int | None, total: int) -> str:
    return "-" if n is None else f"{100 * n / total:.2f} %"


def main() -> int:
    """Run the pairs, print the table and the acceptance verdict."""
    for tool in ("apt-get", "dpkg-deb", "mke2fs"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (Debian)")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="otaguard-bench-delta-") as tmp:
        work = Path(tmp)
        trees = _download(work)
        for a, b in itertools.pairwise(VERSIONS):
            rows.append(
                _measure(f"libcrypto {a} -> {b}", trees[a] / LIBCRYPTO, trees[b] / LIBCRYPTO, work)
            )
        a, b = VERSIONS[1], VERSIONS[2]
        old = _rootfs(trees[a], work / "old.ext4")
        new = _rootfs(trees[b], work / "new.ext4")
        try:
            rows.append(_measure(f"ext4 128 MiB {a} -> {b}", old, new, work))
        except RuntimeError as e:
            print(f"ext4 128 MiB {a} -> {b}: otaguard's delta build failed: {e}")
            print("FAIL")
            return 1

    ok = True
    print("pair | new bytes | otaguard delta | bsdiff4 | full zstd | otaguard/bsdiff | "
          "otaguard/zstd | build s (ours, bsdiff) | apply s (ours, bsdiff) | "
          "apply RSS MiB (ours, bsdiff)")  # fmt: skip
    for r in rows:
        ratio_b = "-" if r.bsdiff is None else f"{r.ours / r.bsdiff:.2f}"
        print(
            f"{r.name} | {r.new_bytes} | {r.ours} ({_pct(r.ours, r.new_bytes)}) | "
            f"{r.bsdiff if r.bsdiff is not None else '-'} ({_pct(r.bsdiff, r.new_bytes)}) | "
            f"{r.zstd} ({_pct(r.zstd, r.new_bytes)}) | {ratio_b} | {r.ours / r.zstd:.3f} | "
            f"{r.ours_build_s:.1f}, {r.bsdiff_build_s or 0:.1f} | "
            f"{r.ours_apply_s:.2f}, {r.bsdiff_apply_s or 0:.2f} | "
            f"{r.ours_rss_mib:.1f}, {r.bsdiff_rss_mib or 0:.1f}"
        )
        if r.bsdiff_note:
            print(f"  {r.bsdiff_note}")
        if r.bsdiff is not None and r.ours > r.bsdiff:
            print(f"  FAIL: larger than bsdiff's ({r.ours} > {r.bsdiff})")
            ok = False
        if r.ours > r.zstd:
            print(f"  FAIL: larger than the full zstd image ({r.ours} > {r.zstd})")
            ok = False
        if r.ours_rss_mib > MAX_APPLY_RSS_MIB:
            print(f"  FAIL: applied in {r.ours_rss_mib:.1f} MiB RSS > {MAX_APPLY_RSS_MIB}")
            ok = False
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
