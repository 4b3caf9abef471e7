"""Compressed and delta updates over the real server: chosen, applied, and fallen back from.

A release 1.1.0 is a patched 1.0.0 published with ``--compress zstd --delta-from 1.0.0``.
A device running 1.0.0 installs it by delta; one whose running image is not the delta's
base, or whose delta is corrupt, falls back (to the compressed blob, then the full image)
and still installs, the cause logged.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from conftest import HW, World
from otaguard.model.transfer import Encodings
from otaguard.repo import Release
from otaguard.repo.transfer import TransferRequest
from sbom_support import sbom_beside

LOGGER = "otaguard.agent"


def _patched(world: World, version: str) -> Path:
    """``version``: the 1.0.0 image with a few edits (as a security fix would be)."""
    data = bytearray(world.image("1.0.0").read_bytes())
    rng = random.Random(version)
    for _ in range(20):
        at = rng.randrange(len(data) - 256)
        data[at : at + 200] = rng.randbytes(200)
    path = world.tmp / f"fw-{version}.img"
    path.write_bytes(bytes(data))
    world.images[version] = path
    return path


def _release(world: World, version: str, **kw: object) -> Release:
    image = _patched(world, version)
    rel = world.repo.add_release(
        image,
        sbom=sbom_beside(image),
        version=version,
        hardware_ids=[HW],
        security=True,
        security_counter=None,
        transfer=TransferRequest(**kw),  # type: ignore[arg-type]
    )
    world.releases[version] = rel
    world.wait_served()
    return rel


def _encodings(world: World, rel: Release) -> Encodings:
    return Encodings.from_custom(world.repo.latest_targets().targets[rel.path].custom)


def _served_blob(world: World, path: str, sha256: str) -> Path:
    """The server's copy of a target blob (what devices download)."""
    found = list((world.tmp / "server").rglob(f"{sha256}.{path}"))
    assert len(found) == 1, found
    return found[0]


def _installed(world: World, dev_dir: Path, version: str) -> bool:
    return world.image(version).read_bytes() == (dev_dir / "slots" / "b.img").read_bytes()


def test_device_on_the_base_installs_by_delta(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    rel = _release(world, "1.1.0", compress="zstd", delta_from=("1.0.0",))
    enc = _encodings(world, rel)
    assert enc.compressed is not None and len(enc.deltas) == 1
    delta = enc.deltas[0]
    assert str(delta.base_version) == "1.0.0"
    assert delta.base_sha256 == world.releases["1.0.0"].sha256
    assert delta.blob.length < rel.length // 20  # a few edits: a small delta
    dev = world.device()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = dev.update()
    assert result.outcome == "updated" and result.to_version == "1.1.0"
    assert _installed(world, dev.paths.root, "1.1.0")
    assert f"{rel.path} obtained by delta ({delta.blob.length} bytes downloaded," in caplog.text


def test_device_off_the_base_uses_the_compressed_blob(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.release("1.0.1")  # another published image: not the delta's base
    rel = _release(world, "1.1.0", compress="zstd", delta_from=("1.0.0",))
    enc = _encodings(world, rel)
    assert enc.compressed is not None
    dev = world.device(version="1.0.1")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = dev.update()
    assert result.outcome == "updated"
    assert _installed(world, dev.paths.root, "1.1.0")
    sha = world.releases["1.0.1"].sha256[:12]
    assert f"no delta from the running image ({sha})" in caplog.text
    assert f"obtained by compressed ({enc.compressed.length} bytes downloaded," in caplog.text


def test_slot_not_matching_its_record_falls_back_to_full(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    rel = _release(world, "1.1.0", delta_from=("1.0.0",))
    dev = world.device()
    slot_a = dev.paths.slots / "a.img"
    data = bytearray(slot_a.read_bytes())
    data[5000:5100] = bytes(100)  # the base's bytes differ from what the record says
    slot_a.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = dev.update()
    assert result.outcome == "updated"
    assert _installed(world, dev.paths.root, "1.1.0")
    assert "delta failed: verification failed: " in caplog.text
    assert "the image written does not match the verified image" in caplog.text
    assert f"{rel.path}: downloading the full image" in caplog.text


def test_corrupted_delta_and_blob_fall_back_to_full(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    rel = _release(world, "1.1.0", compress="zstd", delta_from=("1.0.0",))
    enc = _encodings(world, rel)
    assert enc.compressed is not None
    for ref in (enc.deltas[0].blob, enc.compressed):
        blob = _served_blob(world, ref.path, ref.sha256)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF  # a mirror or the store corrupts them
        blob.write_bytes(bytes(data))
    dev = world.device()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = dev.update()
    assert result.outcome == "updated"
    assert _installed(world, dev.paths.root, "1.1.0")
    assert "delta failed:" in caplog.text and "compressed failed:" in caplog.text
    # streamed: the decoders find the corruption before the blob's hash is complete
    assert "delta is corrupt" in caplog.text and "compressed image is corrupt" in caplog.text
    assert f"{rel.path}: downloading the full image" in caplog.text


def test_sigkilled_agent_resumes_the_delta_apply_where_the_slot_was_fsynced(
    world: World,
) -> None:
    from test_power_loss import assert_verified_image_runs, killed
    from test_stream_resume_real import agent_v, small_checkpoints

    from otaguard.agent import InstallState

    _release(world, "1.1.0", delta_from=("1.0.0",))
    dev = world.device()
    small_checkpoints(dev.paths.root, resume_checkpoint_bytes=128 * 1024)
    resume_at = 0
    for cut in (700_001, 1_500_001, 1_900_001):  # inside the 2 MiB image the delta builds
        killed(dev.paths.root, f"stream-at:{cut}")
        state = InstallState.load(dev.paths.install_state)
        # checkpoints are fsynced and recorded in a thread of their own: the kill may
        # come before one lands; one that landed names the delta that wrote it
        assert (state.written_via or ".delta").endswith(".delta"), state.written_via
        assert resume_at <= state.written <= cut, (cut, state.written)
        resume_at = state.written
        dev.boot()
        assert assert_verified_image_runs(dev) == "A"
    assert resume_at > 0
    upd = agent_v(dev.paths.root, "update")
    assert upd.returncode == 0 and "Traceback" not in upd.stderr, upd.stderr
    assert f"slot B holds {resume_at} checkpointed image bytes: writing from there" in upd.stderr
    assert f"slot written from byte {resume_at})" in upd.stderr
    assert "obtained by delta" in upd.stderr
    assert _installed(world, dev.paths.root, "1.1.0")
