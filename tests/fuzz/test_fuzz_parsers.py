"""Fuzzing every parser of untrusted input: only the designed errors may escape.

Property, for each parser: on any input it returns or raises one of the errors of
``otaguard.model.errors`` (the designed, one-line refusals) and nothing else, within a
time and memory bound. Inputs are arbitrary bytes and JSON, and mutations of a genuine
input (a valid timestamp, manifest, SBOM, delta...), so the fuzzer reaches the checks past
the first parse.

``make test`` runs a short derandomized round (fixed examples, so CI is deterministic);
``make fuzz`` runs each harness for ``FUZZ_SECONDS`` with fresh random inputs.
Hypothesis rather than atheris: atheris has no wheel for this Python (docs/adr/0031).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import shutil
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from otaguard.model.errors import OtaguardError

#: seconds per harness in ``make fuzz``; 0 (the default): the short CI round
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "0"))
#: examples per harness in the CI round (derandomized: the same ones every run)
CI_EXAMPLES = int(os.environ.get("FUZZ_CI_EXAMPLES", "60"))
#: CPU-seconds one input may take (CPU time, not wall time: the machine is shared); a
#: parser that needs more on a few kilobytes is a denial of service
MAX_CPU_SECONDS_PER_INPUT = 5.0
#: peak Python allocation per input; inputs are a few KiB, so more is an amplification
MAX_PEAK_BYTES = 64 * 1024 * 1024

SETTINGS = settings(
    max_examples=CI_EXAMPLES if FUZZ_SECONDS <= 0 else 500,
    derandomize=FUZZ_SECONDS <= 0,
    deadline=None,  # timed below with a generous bound instead (the machine is shared)
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
    # FUZZ_NO_SHRINK=1: report the first failing input as found (shrinking a slow parser's
    # input can take minutes)
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("FUZZ_NO_SHRINK")
    else list(Phase),
)


def run_harness(harness: Callable[[], None]) -> None:
    """Run ``harness`` once (CI round) or again and again for ``FUZZ_SECONDS``."""
    if FUZZ_SECONDS <= 0:
        harness()
        return
    stop = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < stop:
        harness()


def only_designed(
    parse: Callable[[], object], designed: tuple[type[BaseException], ...] = (OtaguardError,)
) -> None:
    """Call ``parse``; a designed error is fine, anything else fails (Hypothesis shrinks it)."""
    tracemalloc.start()
    start = time.process_time()
    try:
        parse()
    except designed:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.process_time() - start
    assert elapsed < MAX_CPU_SECONDS_PER_INPUT, f"one input took {elapsed:.1f} CPU-seconds"
    assert peak < MAX_PEAK_BYTES, f"one input allocated {peak} bytes"


# -- strategies ----------------------------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


def mutated(genuine: bytes) -> st.SearchStrategy[bytes]:
    """Byte-level mutations of ``genuine``: flips, cuts, splices, insertions."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(genuine)
        for _ in range(draw(st.integers(1, 4))):
            if not data:
                break
            i = draw(st.integers(0, len(data) - 1))
            op = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "dup"]))
            if op == "flip":
                data[i] ^= draw(st.integers(1, 255))
            elif op == "cut":
                del data[i : i + draw(st.integers(1, 16))]
            elif op == "insert":
                data[i:i] = draw(st.binary(min_size=1, max_size=16))
            elif op == "truncate":
                del data[i:]
            else:
                data[i:i] = data[i : i + draw(st.integers(1, 64))]
        return bytes(data)

    return mutate()


def json_mutated(genuine: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A genuine JSON object with one field replaced by arbitrary JSON, or removed."""

    def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield (*prefix, k)
                yield from paths(v, (*prefix, k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                yield (*prefix, i)
                yield from paths(v, (*prefix, i))

    all_paths = list(paths(genuine))

    @st.composite
    def mutate(draw: st.DrawFn) -> Any:
        doc = json.loads(json.dumps(genuine))
        path = draw(st.sampled_from(all_paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
        return doc

    return mutate()


# -- device manifests and check-in envelopes (server side) --------------------------------
@pytest.fixture(scope="module")
def device_identity() -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from securesystemslib.signer import CryptoSigner

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz-1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return cert, CryptoSigner(key)


def _genuine_manifest() -> dict[str, Any]:
    from otaguard.model.manifest import MANIFEST_TYPE

    return {
        "_type": MANIFEST_TYPE,
        "serial": "fuzz-1",
        "hardware_id": "hw",
        "nonce": "n" * 32,
        "installed": {
            "path": "fw-1.0.0.img",
            "version": "1.0.0",
            "sha256": "ab" * 32,
            "length": 4096,
            "security_counter": 0,
        },
        "floor": {"version": "1.0.0", "security_counter": 0},
        "last_result": {},
        "attack_flags": [],
        "boot": None,
    }


def test_fuzz_check_in_envelope(device_identity: tuple[Any, Any]) -> None:
    """The check-in body: size cap, envelope, signature, manifest (server)."""
    from otaguard.crypto.envelope import sign_envelope
    from otaguard.server.checkin_verify import verify_manifest

    cert, signer = device_identity
    genuine = sign_envelope(signer, _genuine_manifest())

    @SETTINGS
    @given(st.binary(max_size=2048) | mutated(genuine))
    def harness(body: bytes) -> None:
        only_designed(lambda: verify_manifest(body, certificate=cert, serial="fuzz-1"))

    run_harness(harness)


def test_fuzz_device_manifest_fields() -> None:
    """The signed manifest's fields, past the signature (what a device-key holder controls)."""
    from otaguard.model.manifest import DeviceManifest

    @SETTINGS
    @given(JSON | json_mutated(_genuine_manifest()))
    def harness(doc: Any) -> None:
        only_designed(lambda: DeviceManifest.from_dict(doc))

    run_harness(harness)


def test_fuzz_enrollment_csr() -> None:
    """The EST enrollment body after base64: a DER PKCS#10 CSR (server)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from otaguard.crypto.device_ca import check_device_csr

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz-1")]))
        .sign(key, hashes.SHA256())
    )
    genuine = csr.public_bytes(serialization.Encoding.DER)
    check_device_csr(genuine, serial="fuzz-1")  # the genuine one passes

    @SETTINGS
    @given(st.binary(max_size=1024) | mutated(genuine))
    def harness(der: bytes) -> None:
        only_designed(lambda: check_device_csr(der, serial="fuzz-1"))

    run_harness(harness)


def test_fuzz_sbom() -> None:
    """A release's CycloneDX SBOM (server index, release tool, device binding)."""
    from otaguard.model.sbom import parse_sbom

    genuine = json.dumps(
        {
            "bomFormat": "CycloneDX",
            "specVersion": "1.6",
            "version": 1,
            "components": [
                {
                    "type": "library",
                    "name": "openssl",
                    "version": "3.0.13",
                    "purl": "pkg:generic/openssl@3.0.13",
                }
            ],
        }
    ).encode()
    parse_sbom(genuine)

    @SETTINGS
    @given(st.binary(max_size=1024) | mutated(genuine) | JSON.map(lambda j: json.dumps(j).encode()))
    def harness(data: bytes) -> None:
        only_designed(lambda: parse_sbom(data))

    run_harness(harness)


# -- target custom fields (release info, transfer encodings) -------------------------------
def test_fuzz_target_custom() -> None:
    """A target's ``custom``: release info and the transfer encodings a device follows."""
    from otaguard.model.release import ReleaseInfo
    from otaguard.model.transfer import Encodings

    genuine = {
        "version": "1.2.0",
        "security_counter": 1,
        "hardware_ids": ["hw"],
        "release_type": "security",
        "compressed": {
            "path": "fw.img.zst",
            "format": "zstd",
            "hashes": {"sha256": "ab" * 32},
            "length": 10,
        },
        "deltas": [
            {
                "base_version": "1.0.0",
                "base_sha256": "cd" * 32,
                "base_length": 4096,
                "path": "fw.delta",
                "format": "detools-lzma",
                "hashes": {"sha256": "ef" * 32},
                "length": 321,
            }
        ],
    }

    @SETTINGS
    @given(JSON | json_mutated(genuine))
    def harness(custom: Any) -> None:
        only_designed(lambda: ReleaseInfo.from_custom(custom))
        if isinstance(custom, dict):
            # documented: pure, ValueError on malformed input (the caller names the target)
            only_designed(lambda: Encodings.from_custom(custom), (OtaguardError, ValueError))

    run_harness(harness)


# -- device state files (boot environment, install state, floor) ---------------------------
@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


def test_fuzz_device_state_files(state_dir: Path) -> None:
    """The boot environment, the install state and the file floor, corrupted on disk."""
    from otaguard.agent.install import InstallState
    from otaguard.agent.monotonic import FileMonotonicStore
    from otaguard.agent.slots import BootEnv

    bootenv = {
        "primary": "a",
        "try_slot": None,
        "tries_left": 0,
        "slots": {
            "a": {"version": "1.0.0", "sha256": "ab" * 32, "length": 4096, "security_counter": 0},
            "b": None,
        },
    }
    install = {"phase": "idle", "target": None, "from_slot": None}
    floor = {"version": "1.0.0", "security_counter": 0}
    path = state_dir / "state.json"

    @SETTINGS
    @given(
        st.sampled_from(["bootenv", "install", "floor"]),
        st.one_of(
            st.binary(max_size=512), JSON.map(lambda j: json.dumps(j).encode()), st.just(b"")
        ),
        st.sampled_from([bootenv, install, floor]).flatmap(json_mutated),
    )
    def harness(which: str, raw: bytes, doc: Any) -> None:
        for data in (raw, json.dumps(doc).encode()):
            path.write_bytes(data)
            if which == "bootenv":
                only_designed(lambda: BootEnv.load(path))
            elif which == "install":
                only_designed(lambda: InstallState.load(path))
            else:
                only_designed(lambda: FileMonotonicStore(path).read())

    run_harness(harness)


# -- the delta and compressed-image formats (device) ---------------------------------------
def test_fuzz_delta(tmp_path: Path) -> None:
    """A detools delta against a 4 KiB base, declared to rebuild a 4 KiB image."""
    import random

    from otaguard.delta.apply import decode_delta
    from otaguard.delta.build import build_delta  # type: ignore[attr-defined]

    rng = random.Random(7)
    base = rng.randbytes(4096)
    new = bytearray(base)
    new[100:140] = bytes(40)
    (tmp_path / "base").write_bytes(base)
    (tmp_path / "new").write_bytes(bytes(new))
    build_delta(tmp_path / "base", tmp_path / "new", tmp_path / "d")
    genuine = (tmp_path / "d").read_bytes()

    @SETTINGS
    @given(st.binary(max_size=512) | mutated(genuine), st.integers(1, 64))
    def harness(delta: bytes, split: int) -> None:
        chunks = [delta[i : i + split] for i in range(0, len(delta), split)]
        only_designed(
            lambda: sum(
                len(c)
                for c in decode_delta(
                    iter(chunks),
                    base=io.BytesIO(base),
                    base_length=len(base),
                    image_length=len(new),
                )
            )
        )

    run_harness(harness)


def test_fuzz_compressed_image() -> None:
    """A zstd blob declared to hold a 64 KiB image (compression bombs included)."""
    import zstandard

    from otaguard.delta.zstd import decode_zstd

    genuine = zstandard.ZstdCompressor().compress(bytes(65536))

    @SETTINGS
    @given(st.binary(max_size=512) | mutated(genuine))
    def harness(blob: bytes) -> None:
        only_designed(lambda: sum(len(c) for c in decode_zstd([blob], image_length=65536)))

    run_harness(harness)


# -- the director's instruction (device) ---------------------------------------------------
def test_fuzz_director_instruction() -> None:
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root

    from otaguard.agent.director import verify_director_targets
    from otaguard.model.release import ReleaseInfo
    from otaguard.model.version import Version
    from otaguard.server.director import DirectorRelease, sign_instruction

    root_key, director_key = CryptoSigner.generate_ecdsa(), CryptoSigner.generate_ecdsa()
    root = Root()
    for role in ("root", "timestamp", "snapshot", "targets"):
        root.add_key((root_key if role == "root" else director_key).public_key, role)
    Metadata(root)
    now = dt.datetime.now(dt.UTC)
    info = ReleaseInfo(Version.parse("1.1.0"), 0, ("hw",), "feature")
    release = DirectorRelease("fw-1.1.0.img", 100, {"sha256": "ab" * 32}, info)
    genuine = sign_instruction(
        release, serial="s1", hardware_id="hw", nonce="n1", now=now, signer=director_key
    )
    verify_director_targets(genuine, root=root, serial="s1", hardware_id="hw", nonce="n1", now=now)
    doc = json.loads(genuine)

    @SETTINGS
    @given(
        st.binary(max_size=1024)
        | mutated(genuine)
        | json_mutated(doc).map(lambda j: json.dumps(j).encode())
    )
    def harness(data: bytes) -> None:
        only_designed(
            lambda: verify_director_targets(
                data, root=root, serial="s1", hardware_id="hw", nonce="n1", now=now
            )
        )

    run_harness(harness)


# -- TUF metadata through the agent's verification entry (device) --------------------------
@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A local (server-less) repository's files with 1.0.0 published."""
    from otaguard.repo import ImageRepository
    from otaguard.sim.memory import read_repository_files
    from sbom_support import sbom_beside

    tmp = tmp_path_factory.mktemp("repo")
    repo = ImageRepository.init(tmp / "repo", keys_dir=tmp / "keys", passphrases=lambda _n: b"pw")
    image = tmp / "fw.img"
    image.write_bytes(b"\x01" * 4096)
    repo.add_release(
        image,
        version="1.0.0",
        hardware_ids=["hw"],
        security=False,
        security_counter=None,
        sbom=sbom_beside(image),
    )
    files = read_repository_files(repo.dir)
    files["trusted-root"] = (repo.metadata_dir / "1.root.json").read_bytes()
    return files


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets", "root"])
def test_fuzz_tuf_metadata(
    repository: dict[str, bytes], role: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """One role's bytes replaced by fuzzed ones; the device refreshes and lists offers."""
    from otaguard.agent.updater import TufSession
    from otaguard.sim.memory import MemoryFetcher

    names = sorted(
        n
        for n in repository
        if (n.startswith("metadata/") and n.endswith(f".{role}.json"))
        or n == f"metadata/{role}.json"
    )
    if role == "root":
        name = "metadata/2.root.json"  # the next root a device asks for
        genuine = repository["trusted-root"]
    else:
        name = names[-1] if role != "timestamp" else "metadata/timestamp.json"
        genuine = repository[name]
    doc = json.loads(genuine)
    cache = tmp_path_factory.mktemp(f"cache-{role}")

    @SETTINGS
    @given(
        st.binary(max_size=1024)
        | mutated(genuine)
        | json_mutated(doc).map(lambda j: json.dumps(j).encode())
    )
    def harness(data: bytes) -> None:
        shutil.rmtree(cache)
        cache.mkdir()
        files = {k: v for k, v in repository.items() if k != "trusted-root"}
        files[name] = data

        def refresh() -> None:
            session = TufSession(
                metadata_dir=cache,
                trusted_root=repository["trusted-root"],
                server_url="https://repo.invalid",
                fetcher=MemoryFetcher(files),
            )
            session.refresh()
            session.offers("hw")

        only_designed(refresh)

    run_harness(harness)


_ = base64  # the EST body's base64 layer is python's own; the CSR parser is fuzzed above
