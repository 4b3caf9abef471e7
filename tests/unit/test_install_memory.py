"""The real agent against an in-memory repository: power cuts after every action, the
anti-rollback floor at boot, recovery, and refusals that end an install cleanly.

No server and no socket: the device's fetcher is :class:`otaguard.sim.memory.MemoryFetcher`
serving the repository directory's files from a dict. Everything else is the real code
(ngclient, selection, the install machine and its driver, the simulated bootloader).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import HW, same_passphrase
from otaguard.agent import BootEnv, Device, Phase
from otaguard.agent.install import Action
from otaguard.crypto import CertificateAuthority
from otaguard.model import DowngradeError, Version
from otaguard.repo import ImageRepository
from otaguard.sim import SIM_HEALTH_COMMAND, make_image
from otaguard.sim.memory import MemoryFetcher, read_repository_files
from sbom_support import sbom_beside

SIZE = 256 * 1024


class PowerCut(BaseException):
    """Stands for the power going out: nothing in the agent may catch it."""


@dataclasses.dataclass
class Mem:
    tmp: Path
    repo: ImageRepository
    ca: Path
    images: dict[str, Path]

    def image(self, version: str, *, unhealthy: bool = False) -> Path:
        if version not in self.images:
            self.images[version] = make_image(
                self.tmp / f"fw-{version}.img", size=SIZE, seed=version, unhealthy=unhealthy
            )
        return self.images[version]

    def release(self, version: str, *, security: bool = False, unhealthy: bool = False) -> None:
        self.repo.add_release(
            self.image(version, unhealthy=unhealthy),
            sbom=sbom_beside(self.image(version, unhealthy=unhealthy)),
            version=version,
            hardware_ids=[HW],
            security=security,
            security_counter=None,
        )

    def provision(self, name: str) -> Path:
        Device.provision(
            self.tmp / name,
            server_url="https://repo.invalid",
            root_json=self.repo.metadata_dir / "root.json",
            ca_pem=self.ca,
            hardware_id=HW,
            serial=name,
            factory_image=self.image("1.0.0"),
            factory_version="1.0.0",
            health_command=SIM_HEALTH_COMMAND,
        )
        return self.tmp / name

    def open(self, path: Path, after: Callable[[Action], None] | None = None) -> Device:
        files = read_repository_files(self.repo.dir)
        return Device(path, fetcher_factory=lambda: MemoryFetcher(files), after_action=after)


@pytest.fixture
def mem(tmp_path: Path) -> Mem:
    # Server-less repository: complete and static, as any mirror would serve it.
    repo = ImageRepository.init(
        tmp_path / "repo", keys_dir=tmp_path / "keys", passphrases=same_passphrase
    )
    ca = CertificateAuthority.load_or_create(tmp_path / "ca").cert_path
    m = Mem(tmp_path, repo, ca, {})
    m.release("1.0.0")
    return m


def cut_after(n: int) -> Callable[[Action], None]:
    count = 0

    def hook(action: Action) -> None:
        nonlocal count
        count += 1
        if count == n:
            raise PowerCut(action.name)

    return hook


def actions_of_one_update(mem: Mem) -> list[str]:
    seen: list[str] = []
    dev = mem.open(mem.provision("probe"), after=lambda a: seen.append(a.name))
    assert dev.update().outcome in ("updated", "rolled-back")
    return seen


def assert_committed(dev: Device, version: str = "1.1.0", *, retired: bool = True) -> None:
    st = dev.status()
    assert st.booted is not None and st.booted.version == version and not st.booted.recovery
    image = st.bootenv.slots[st.bootenv.primary]
    assert image is not None and image.version == version
    assert dev.backend.digest(st.bootenv.primary, image.length) == image.sha256
    assert st.bootenv.try_slot is None
    assert str(st.floor.version) == version
    other = "A" if st.bootenv.primary == "B" else "B"
    if retired:
        assert st.bootenv.slots[other] is None, "the slot below the floor must be retired"
    assert st.install.phase is Phase.IDLE
    assert list(dev.paths.staging.iterdir()) == []


def test_update_runs_without_a_server(mem: Mem) -> None:
    mem.release("1.1.0", security=True)
    dev = mem.open(mem.provision("d"))
    result = dev.update()
    assert result.outcome == "updated" and result.to_version == "1.1.0"
    assert_committed(dev)


def test_power_cut_after_every_action_then_resume_commits(mem: Mem) -> None:
    mem.release("1.1.0", security=True)
    names = actions_of_one_update(mem)
    assert {"stream_to_slot", "arm", "reboot", "health_check", "raise_floor"} <= set(names)
    for k in range(1, len(names) + 1):
        path = mem.provision(f"cut-{k}")
        with pytest.raises(PowerCut):
            mem.open(path, after=cut_after(k)).update()
        dev = mem.open(path)
        dev.boot()  # power on
        result = dev.update()
        assert result.outcome == "updated", (k, names[k - 1], result)
        assert_committed(dev)


def test_power_cuts_during_every_resume(mem: Mem) -> None:
    """Power fails again while resuming: run i is cut after its i-th action."""
    mem.release("1.1.0", security=True)
    path = mem.provision("flaky")
    cuts = 0
    for i in range(1, 60):
        try:
            mem.open(path, after=cut_after(i)).update()
        except PowerCut:
            cuts += 1
            mem.open(path).boot()
            continue
        break
    assert cuts >= 3
    assert_committed(mem.open(path))


def test_power_cuts_during_a_bad_release_still_roll_back(mem: Mem) -> None:
    mem.release("1.1.0", unhealthy=True)
    names = actions_of_one_update(mem)
    for k in range(1, len(names) + 1):
        path = mem.provision(f"bad-{k}")
        with pytest.raises(PowerCut):
            mem.open(path, after=cut_after(k)).update()
        dev = mem.open(path)
        dev.boot()
        result = dev.update()
        assert result.outcome in ("rolled-back", "up-to-date"), (k, names[k - 1], result)
        st = dev.status()
        assert st.booted is not None and st.booted.slot == "A" and st.booted.version == "1.0.0"
        assert st.bootenv.slots["B"] is None and str(st.floor.version) == "1.0.0"
        assert st.install.phase is Phase.IDLE


def test_corrupted_new_slot_never_boots_the_old_image_below_the_floor(mem: Mem) -> None:
    """The reported hole: corrupt the committed slot; the device must not fall back to 1.0.0."""
    mem.release("1.1.0", security=True)
    dev = mem.open(mem.provision("d"))
    assert dev.update().outcome == "updated"
    primary = dev.status().bootenv.primary
    with open(dev.backend.path(primary), "r+b") as f:
        f.seek(SIZE // 2)
        byte = f.read(1)
        f.seek(SIZE // 2)
        f.write(bytes([byte[0] ^ 0x01]))

    rec = dev.boot()
    assert rec.recovery and rec.slot is None
    assert "failed verification" in rec.note and "recovery" in rec.note
    assert dev.status().booted is not None

    result = dev.update()
    assert result.outcome == "recovered" and result.to_version == "1.1.0"
    assert "recovered" in result.detail
    # Recovery wrote the other slot; the corrupt one stays as evidence and never boots.
    assert_committed(dev, retired=False)
    assert dev.status().bootenv.primary != primary
    assert dev.boot().slot != primary


def test_boot_refuses_a_primary_below_the_floor(mem: Mem) -> None:
    """A boot environment put back to the old slot (restored backup, cloned files) must not
    start an image the floor forbids, even though its digest verifies."""
    mem.release("1.1.0", security=True)
    dev = mem.open(mem.provision("d"))
    assert dev.update().outcome == "updated"
    env = BootEnv.load(dev.paths.bootenv)
    old = dev.status()
    # Put slot A's 1.0.0 record back and make it primary, as an attacker with the files would.
    fresh = mem.open(mem.provision("factory"))
    env.slots["A"] = fresh.status().bootenv.slots["A"]
    env.primary = "A"
    env.save(dev.paths.bootenv)
    assert old.bootenv.slots["B"] is not None

    rec = dev.boot()
    assert rec.slot == "B" and rec.version == "1.1.0"
    assert "below the anti-rollback floor" in rec.note


def test_floor_raised_before_arm_refuses_cleanly_and_does_not_wedge(mem: Mem) -> None:
    """A refusal inside the install is a transition: recorded, cleaned up, not stuck."""
    mem.release("1.1.0")
    path = mem.provision("d")

    def raise_floor_after_verify(action: Action) -> None:
        if action.name == "stream_to_slot":
            # Something else (another install, a restored backup) moved the floor meanwhile.
            Device(path).monotonic.raise_to(Version.parse("1.5.0"), 0)

    dev = mem.open(path, after=raise_floor_after_verify)
    with pytest.raises(DowngradeError, match=r"1\.1\.0 is below the installed 1\.5\.0"):
        dev.update()
    st = dev.status()
    assert st.install.phase is Phase.IDLE
    assert st.install.last_result is not None and st.install.last_result["outcome"] == "refused"
    assert st.bootenv.slots["B"] is None and st.bootenv.try_slot is None
    assert list(dev.paths.staging.iterdir()) == []
    # Not wedged: the next update runs the normal path (nothing above 1.5.0 is offered).
    with pytest.raises(DowngradeError, match=r"anti-rollback floor 1\.5\.0"):
        mem.open(path).update()
    mem.release("1.6.0")
    assert mem.open(path).update().outcome == "updated"


def flip_byte(path: Path, offset: int = SIZE // 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x80]))


def test_no_staging_copy_and_one_pass_over_the_network(mem: Mem) -> None:
    """The image goes from the fetcher into the slot: staging never holds it, and the
    blob is fetched once, whole, with no Range (nothing to resume)."""
    mem.release("1.1.0")
    path = mem.provision("d")
    files = read_repository_files(mem.repo.dir)
    blob = next(p for p in files if p.startswith("targets/") and p.endswith("-1.1.0.img"))
    seen: list[list[str]] = []

    def look(action: Action) -> None:
        seen.append([p.name for p in (path / "staging").iterdir()])

    fetcher = MemoryFetcher(files)
    dev = Device(path, fetcher_factory=lambda: fetcher, after_action=look)
    assert dev.update().outcome == "updated"
    assert_committed(dev)
    assert all(not any(n.endswith(".img") for n in names) for names in seen), seen
    assert fetcher.ranges[blob] == [0] and fetcher.served[blob] == SIZE
