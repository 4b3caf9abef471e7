"""Attacks by a hostile HTTPS server standing between a real agent and the real server.

The attacker holds the server's TLS certificate and key and a copy of the device's own
identity files (tests/mitm_support.py), so TLS and mutual TLS succeed: whatever the device
refuses, it refuses on the TUF verification and its limits alone. Each test ends with the
device still on its verified 1.1.0, nothing in progress, its floor unchanged.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator

import pytest

from attack_support import (
    assert_untouched,
    updated,  # noqa: F401 - the fixture
)
from conftest import IMAGE_SIZE, PASSPHRASE, World
from mitm_support import Act, Mitm, mitm, point_device_at, silent_tls_port
from otaguard.agent import Device
from otaguard.model.errors import TransportError, VerificationError
from otaguard.model.limits import METADATA_MAX_LENGTHS
from otaguard.sim.attacks import CompromisedServer, steal_key

#: the slow-retrieval deadline the victim runs with (its whole-download deadline is this
#: plus length / min rate); short so the trickling tests end quickly
DEADLINE_BASE_S = 2.0
#: on a loaded 2-core machine giving up may take a while longer than the deadline
GIVE_UP_BOUND_S = 15.0

Mirrored = tuple[World, Device, Mitm]


@pytest.fixture
def mirrored(updated: tuple[World, Device, CompromisedServer]) -> Iterator[Mirrored]:
    """The 1.1.0 device, now talking to the hostile mirror, with 1.2.0 waiting upstream."""
    world, dev, _ = updated
    world.release("1.2.0")
    assert world.server.ca_cert is not None
    with mitm(
        data_dir=world.server.data_dir,
        upstream=world.server.base_url,
        ca_pem=world.server.ca_cert,
        stolen_identity=dev,
    ) as m:
        victim = point_device_at(
            dev, m.url, download_deadline_base_s=DEADLINE_BASE_S, read_timeout_s=5.0
        )
        yield world, victim, m


def _on(pattern: str, act: Act) -> object:
    rx = re.compile(pattern)
    return lambda _method, path: act if rx.search(path) else Act()


#: the 1.2.0 image blob (consistent snapshot: ``<sha256>.<target name>``)
IMAGE_PATH = r"/targets/[0-9a-f]{64}\.fw-1\.2\.0[^/]*\.img$"
ROLE_PATHS = {
    # the device asks for the next root first; the real server has none (404)
    "root": r"/metadata/\d+\.root\.json$",
    "timestamp": r"/metadata/timestamp\.json$",
    "snapshot": r"/metadata/\d+\.snapshot\.json$",
    "targets": r"/metadata/\d+\.targets\.json$",
}


def test_the_honest_mirror_forwards_and_the_device_updates(mirrored: Mirrored) -> None:
    """The harness itself: with nothing changed, the update goes through the mirror."""
    _, dev, m = mirrored
    assert dev.update().outcome == "updated"
    assert any(re.search(IMAGE_PATH, p) for _, p in m.seen)


@pytest.mark.parametrize("role", list(ROLE_PATHS))
def test_endless_metadata_is_cut_at_the_role_cap(mirrored: Mirrored, role: str) -> None:
    _, dev, m = mirrored
    m.rule = _on(ROLE_PATHS[role], Act("endless"))  # type: ignore[assignment]
    with pytest.raises(VerificationError, match=rf"{role}\.json: more than the expected") as e:
        dev.update()
    cut_at = int(re.findall(r"more than the expected (\d+) bytes", str(e.value))[0])
    assert cut_at <= METADATA_MAX_LENGTHS[role]
    assert any(re.search(ROLE_PATHS[role], p) for _, p in m.seen)
    assert_untouched(dev)


def test_endless_image_is_cut_at_its_signed_length(mirrored: Mirrored) -> None:
    _, dev, m = mirrored
    m.rule = _on(IMAGE_PATH, Act("endless"))  # type: ignore[assignment]
    with pytest.raises(VerificationError, match=rf"more than the expected {IMAGE_SIZE} bytes"):
        dev.update()
    assert_untouched(dev)
    assert not any(dev.paths.staging.iterdir()), "the endless download must be discarded"


def test_deeply_nested_json_metadata_is_refused(mirrored: Mirrored) -> None:
    """A timestamp within the byte cap whose nesting would exhaust a recursive parser."""
    _, dev, m = mirrored
    depth = METADATA_MAX_LENGTHS["timestamp"] // 2 - 1
    m.rule = _on(  # type: ignore[assignment]
        ROLE_PATHS["timestamp"], Act("replace", body=b"[" * depth + b"]" * depth)
    )
    with pytest.raises(
        VerificationError,
        match=DEEP_JSON_REFUSAL,
    ):
        dev.update()
    assert_untouched(dev)


def test_tampered_metadata_from_the_mirror_is_refused(mirrored: Mirrored) -> None:
    """Malicious mirror: it raises the expiry of a genuine timestamp; the signature breaks."""
    _, dev, m = mirrored

    def extend(body: bytes) -> bytes:
        md = json.loads(body)
        md["signed"]["expires"] = "2099-01-01T00:00:00Z"
        return json.dumps(md).encode()

    m.rule = _on(ROLE_PATHS["timestamp"], Act("transform", body=extend))  # type: ignore[assignment]
    with pytest.raises(VerificationError, match=r"timestamp was signed by 0/"):
        dev.update()
    assert_untouched(dev)


def test_mix_and_match_of_targets_versions_is_refused(mirrored: Mirrored) -> None:
    """The mirror answers a request for targets version N with version N-1's bytes."""
    world, dev, m = mirrored
    older = world.repo.latest_version("targets") - 1
    old_bytes = (world.repo.metadata_dir / f"{older}.targets.json").read_bytes()
    m.rule = _on(ROLE_PATHS["targets"], Act("replace", body=old_bytes))  # type: ignore[assignment]
    with pytest.raises(VerificationError, match=MIX_REFUSAL):
        dev.update()
    assert_untouched(dev)


def test_truncated_image_is_refused(mirrored: Mirrored) -> None:
    """A partial download (the image's first half, honestly labelled) is never installed."""
    _, dev, m = mirrored
    m.rule = _on(  # type: ignore[assignment]
        IMAGE_PATH, Act("transform", body=lambda b: b[: len(b) // 2])
    )
    with pytest.raises((VerificationError, TransportError), match=r"length|hash|short|truncated"):
        dev.update()
    assert_untouched(dev)


def test_trickled_headers_hit_the_deadline(mirrored: Mirrored) -> None:
    _, dev, m = mirrored
    m.rule = _on(ROLE_PATHS["timestamp"], Act("trickle-head"))  # type: ignore[assignment]
    with pytest.raises(TransportError, match="deadline"):
        dev.update()
    assert_untouched(dev)


def test_trickled_metadata_body_hits_the_deadline(mirrored: Mirrored) -> None:
    _, dev, m = mirrored
    m.rule = _on(ROLE_PATHS["snapshot"], Act("trickle-body"))  # type: ignore[assignment]
    with pytest.raises(TransportError, match="deadline"):
        dev.update()
    assert_untouched(dev)


def test_stalled_tls_handshake_hits_the_deadline(
    updated: tuple[World, Device, CompromisedServer],
) -> None:
    """The 'server' accepts TCP and never answers the ClientHello."""
    _, dev, _ = updated
    with silent_tls_port() as port:
        victim = point_device_at(
            dev, f"https://127.0.0.1:{port}", download_deadline_base_s=DEADLINE_BASE_S,
            connect_timeout_s=DEADLINE_BASE_S, read_timeout_s=DEADLINE_BASE_S,
        )  # fmt: skip
        with pytest.raises(TransportError, match=r"deadline|timed out"):
            victim.update()
    assert_untouched(victim)


def test_dropped_image_request_is_an_error_not_up_to_date(mirrored: Mirrored) -> None:
    """Drop-request: the mirror cuts every image request; the device never hears "nothing new".

    It reports the transport failure (so an operator sees a device that cannot update)
    and updates as soon as the requests get through again.
    """
    _, dev, m = mirrored
    m.rule = _on(IMAGE_PATH, Act("drop"))  # type: ignore[assignment]
    with pytest.raises(TransportError):
        dev.update()
    assert_untouched(dev)
    m.rule = lambda _m, _p: Act()  # type: ignore[assignment]
    assert dev.update().outcome == "updated"


# -- freeze: each role expired, validly signed --------------------------------------------
#: python-tuf's refusal of a targets version other than the snapshot names
MIX_REFUSAL = r"BadVersionNumberError: Expected targets v\d+, got v\d+"
TARGETS_KEYS = ("targets-ed25519", "targets-ml-dsa-65")
#: the refusal of a deeply nested document names the role and python-tuf's parse error
DEEP_JSON_REFUSAL = r"timestamp.*(Deserializ|JSON)|(Deserializ|JSON).*timestamp|Failed to"
PAST = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)


def test_expired_snapshot_is_refused(updated: tuple[World, Device, CompromisedServer]) -> None:
    """The stolen online key signs a fresh timestamp over a snapshot that has expired."""
    world, dev, attacker = updated
    world.server.app.state.resign.stop()
    attacker.serve_targets_version(world.repo.latest_version("targets"), snapshot_expires=PAST)
    with pytest.raises(VerificationError, match=r"snapshot.*[Ee]xpired|[Ee]xpired.*snapshot"):
        dev.update()
    assert_untouched(dev)


def test_expired_targets_is_refused(updated: tuple[World, Device, CompromisedServer]) -> None:
    """Targets validly signed by the full threshold, but expired, under fresh online roles."""
    world, dev, attacker = updated
    world.server.app.state.resign.stop()
    attacker.inject_targets(
        signers=[steal_key(world.repo, n, PASSPHRASE) for n in TARGETS_KEYS],
        target_path="fw-9.9.9.img",
        payload=b"x" * 1000,
        custom={"version": "9.9.9", "security_counter": 9, "hardware_ids": ["test-hw"],
                "release_type": "security"},
        targets_expires=PAST,
    )  # fmt: skip
    with pytest.raises(VerificationError, match=r"ExpiredMetadataError.*targets|targets.*expired"):
        dev.update()
    assert_untouched(dev)


def test_expired_root_is_refused(updated: tuple[World, Device, CompromisedServer]) -> None:
    """A next root signed by every root key but expired: the device stops, it does not trust it."""
    from tuf.api.metadata import Metadata, Root

    world, dev, attacker = updated
    root = Metadata[Root].from_file(str(world.repo.metadata_dir / "root.json"))
    root.signed.version += 1
    root.signed.expires = PAST.replace(microsecond=0)
    root.signatures.clear()
    for name in ("root-ed25519", "root-ml-dsa-65"):
        root.sign(steal_key(world.repo, name, PASSPHRASE), append=True)
    attacker.plant_root(root.to_bytes())
    with pytest.raises(VerificationError, match=r"ExpiredMetadataError.*root|root.*expired"):
        dev.update()
    assert_untouched(dev)
