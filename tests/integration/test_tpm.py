"""The anti-rollback floor in a real (software) TPM: swtpm, tpm2-pytss, NV counters.

Each test starts its own swtpm (``tests/tpm_support.py``) on a fresh state directory, so
its counters start from nothing. Device tests run the real agent against an in-memory
repository (as ``tests/unit/test_install_memory.py`` does), with the floor in the TPM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import HW, same_passphrase
from otaguard.agent import BootEnv, Device, FileMonotonicStore, Floor, SlotImage
from otaguard.agent.install import Action
from otaguard.agent.installer import file_sha256
from otaguard.agent.tpm import (
    DEFAULT_SECURITY_INDEX,
    MAX_INCREMENTS_PER_RAISE,
    TpmMonotonicStore,
    decode_version,
    encode_version,
)
from otaguard.crypto import CertificateAuthority
from otaguard.model import ConfigError, DeviceStorageError, DowngradeError, Version
from otaguard.repo import ImageRepository
from otaguard.sim import SIM_HEALTH_COMMAND, make_image
from otaguard.sim.memory import MemoryFetcher, read_repository_files
from sbom_support import sbom_beside
from tpm_support import Swtpm, running_swtpm

SIZE = 256 * 1024
V = Version.parse


class PowerCut(BaseException):
    """Stands for the power going out: nothing in the agent may catch it."""


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A private swtpm on a fresh state directory, stopped at the end of the test."""
    with running_swtpm(tmp_path / "tpmstate") as tpm:
        yield tpm


def tpm_store(tpm: Swtpm, tmp_path: Path) -> TpmMonotonicStore:
    return TpmMonotonicStore.provision(tpm.tcti, tmp_path / "monotonic.json", Floor(V("1.0.0"), 0))


# -- the store --------------------------------------------------------------------------
def test_floor_survives_a_tpm_restart(swtpm: Swtpm, tmp_path: Path) -> None:
    store = tpm_store(swtpm, tmp_path)
    assert store.read() == Floor(V("1.0.0"), 0)
    store.raise_to(V("1.2.3"), 2)

    swtpm.restart()  # power cycle: a new process on the same NV state
    (tmp_path / "monotonic.json").unlink()  # nothing but the TPM remembers
    again = TpmMonotonicStore(swtpm.tcti, tmp_path / "monotonic.json")
    assert again.read_tpm() == (decode_version(encode_version(V("1.2.3"))), 2)
    assert again.read() == Floor(V("1.2.3-0"), 2)
    with pytest.raises(DowngradeError):
        again.raise_to(V("1.2.2"), 2)
    with pytest.raises(DowngradeError):
        again.raise_to(V("1.2.3"), 1)


def test_raise_to_lower_is_refused_and_the_tpm_is_unchanged(swtpm: Swtpm, tmp_path: Path) -> None:
    store = tpm_store(swtpm, tmp_path)
    store.raise_to(V("1.1.0"), 1)
    before = store.read_tpm()
    # Even with the file gone (only the TPM left to refuse), nothing goes down.
    store.file.path.unlink()
    for version, counter in (("1.0.9", 1), ("1.1.0", 0), ("0.9.0", 0)):
        with pytest.raises(DowngradeError):
            store.raise_to(V(version), counter)
        assert store.read_tpm() == before
    store.raise_to(V("1.1.0"), 1)  # the same floor again is no change
    assert store.read_tpm() == before


def test_absurd_jumps_are_refused_before_any_increment(swtpm: Swtpm, tmp_path: Path) -> None:
    store = tpm_store(swtpm, tmp_path)
    with pytest.raises(ConfigError, match="absurd"):
        store.raise_to(V("1.0.0"), MAX_INCREMENTS_PER_RAISE + 1)
    with pytest.raises(ConfigError, match="absurd"):
        store.raise_to(V("100.0.0"), 1)
    assert store.read_tpm() == (V("1.0.0-0"), 0)


def test_undefined_index_and_unreachable_tpm_are_clear_errors(swtpm: Swtpm, tmp_path: Path) -> None:
    tpm_store(swtpm, tmp_path)
    other = TpmMonotonicStore(swtpm.tcti, tmp_path / "m.json", security_index=0x01500B00)
    with pytest.raises(ConfigError, match="not provisioned"):
        other.read()
    swtpm.stop()
    with pytest.raises(DeviceStorageError, match="TPM"):
        TpmMonotonicStore(swtpm.tcti, tmp_path / "monotonic.json").read()


def test_provisioning_refuses_a_tpm_already_above_the_factory_floor(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    tpm_store(swtpm, tmp_path).raise_to(V("2.0.0"), 3)
    with pytest.raises(ConfigError, match="cannot provision"):
        TpmMonotonicStore.provision(swtpm.tcti, tmp_path / "again.json", Floor(V("1.0.0"), 0))


def _redefine(tcti: str, index: int, *, counter: bool) -> None:
    """The owner-authorised attacker: delete the index and define it again."""
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_NT, TPMA_NV
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    nt = TPM2_NT.COUNTER if counter else TPM2_NT.ORDINARY
    attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.NO_DA | (nt << TPMA_NV.TPM2_NT_SHIFT)
    public = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=8
        )
    )
    with ESAPI(tcti) as ctx:
        ctx.nv_undefine_space(ctx.tr_from_tpmpublic(index), auth_handle=ESYS_TR.RH_OWNER)
        handle = ctx.nv_define_space(None, public, auth_handle=ESYS_TR.RH_OWNER)
        if counter:
            ctx.nv_increment(handle, auth_handle=ESYS_TR.RH_OWNER)
        else:
            ctx.nv_write(handle, (1).to_bytes(8, "big"), 0, auth_handle=ESYS_TR.RH_OWNER)


def test_provisioning_resumes_after_a_cut_between_definition_and_first_increment(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_NT, TPMA_NV
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.NO_DA
    public = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=DEFAULT_SECURITY_INDEX,
            nameAlg=TPM2_ALG.SHA256,
            attributes=attrs | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT),
            dataSize=8,
        )
    )
    with ESAPI(swtpm.tcti) as ctx:  # defined, never incremented: unreadable
        ctx.nv_define_space(None, public, auth_handle=ESYS_TR.RH_OWNER)
    with pytest.raises(ConfigError, match="not provisioned"):
        TpmMonotonicStore(swtpm.tcti, tmp_path / "m.json").read_tpm()
    assert tpm_store(swtpm, tmp_path).read() == Floor(V("1.0.0"), 0)


def test_redefining_an_index_never_lowers_the_floor(swtpm: Swtpm, tmp_path: Path) -> None:
    store = tpm_store(swtpm, tmp_path)
    store.raise_to(V("1.3.0"), 5)
    # Redefined as a counter, it starts above the highest value a deleted counter had.
    _redefine(swtpm.tcti, store.security_index, counter=True)
    assert store.read_tpm()[1] >= 5
    # Redefined as an ordinary index (which can be written low), it is refused.
    _redefine(swtpm.tcti, store.version_index, counter=False)
    with pytest.raises(ConfigError, match="not an NV counter"):
        store.read()


# -- the device -------------------------------------------------------------------------
@dataclasses.dataclass
class Mem:
    tmp: Path
    repo: ImageRepository
    ca: Path
    tpm: Swtpm
    images: dict[str, Path]

    def image(self, version: str) -> Path:
        if version not in self.images:
            self.images[version] = make_image(
                self.tmp / f"fw-{version}.img", size=SIZE, seed=version
            )
        return self.images[version]

    def release(self, version: str, *, security: bool = False) -> None:
        self.repo.add_release(
            self.image(version),
            sbom=sbom_beside(self.image(version)),
            version=version,
            hardware_ids=[HW],
            security=security,
            security_counter=None,
        )

    def provision(self, name: str, *, tpm: bool = True) -> Path:
        Device.provision(
            self.tmp / name,
            serial=name,
            server_url="https://repo.invalid",
            root_json=self.repo.metadata_dir / "root.json",
            ca_pem=self.ca,
            hardware_id=HW,
            factory_image=self.image("1.0.0"),
            factory_version="1.0.0",
            health_command=SIM_HEALTH_COMMAND,
            tpm_tcti=self.tpm.tcti if tpm else None,
        )
        return self.tmp / name

    def open(self, path: Path, after: Callable[[Action], None] | None = None) -> Device:
        files = read_repository_files(self.repo.dir)
        return Device(path, fetcher_factory=lambda: MemoryFetcher(files), after_action=after)


@pytest.fixture
def mem(tmp_path: Path, swtpm: Swtpm) -> Mem:
    repo = ImageRepository.init(
        tmp_path / "repo", keys_dir=tmp_path / "keys", passphrases=same_passphrase
    )
    ca = CertificateAuthority.load_or_create(tmp_path / "ca").cert_path
    m = Mem(tmp_path, repo, ca, swtpm, {})
    m.release("1.0.0")
    m.release("1.1.0", security=True)
    return m


def tpm_of(dev: Device) -> TpmMonotonicStore:
    assert isinstance(dev.monotonic, TpmMonotonicStore)
    return dev.monotonic


def test_update_commits_and_raises_the_tpm_counters(mem: Mem) -> None:
    dev = mem.open(mem.provision("d"))
    assert tpm_of(dev).read_tpm() == (V("1.0.0-0"), 0)
    result = dev.update()
    assert result.outcome == "updated" and result.to_version == "1.1.0"
    assert tpm_of(dev).read_tpm() == (V("1.1.0-0"), 1)
    st = dev.status()
    assert st.floor == Floor(V("1.1.0"), 1)
    assert st.booted is not None and st.booted.version == "1.1.0"

    mem.tpm.restart()
    assert tpm_of(mem.open(dev.paths.root)).read_tpm() == (V("1.1.0-0"), 1)


def _plant_old_image(mem: Mem, dev: Device) -> None:
    """The attacker: the old 1.0.0 image back in the retired slot, made primary, and a
    fresh anti-rollback file at the factory floor."""
    env = BootEnv.load(dev.paths.bootenv)
    old_slot = "A" if env.primary == "B" else "B"
    dev.backend.write(old_slot, mem.image("1.0.0"))
    env.slots[old_slot] = SlotImage(
        target="factory-1.0.0",
        version="1.0.0",
        security_counter=0,
        sha256=file_sha256(mem.image("1.0.0")),
        length=SIZE,
    )
    env.primary = old_slot
    env.save(dev.paths.bootenv)
    dev.paths.monotonic.unlink()
    FileMonotonicStore.create(dev.paths.monotonic, Floor(V("1.0.0"), 0))


def test_rewritten_device_files_cannot_lower_the_tpm_floor(mem: Mem) -> None:
    dev = mem.open(mem.provision("d"))
    assert dev.update().outcome == "updated"
    _plant_old_image(mem, dev)

    assert dev.status().floor == Floor(V("1.1.0-0"), 1)
    record = dev.boot()
    assert record.version == "1.1.0", "the bootloader started the old image"
    assert "below the anti-rollback floor" in record.note
    assert tpm_of(dev).read_tpm() == (V("1.1.0-0"), 1)


def test_without_the_tpm_the_same_attack_succeeds(mem: Mem) -> None:
    """The control: the file store alone is lowered by the same rewrite."""
    dev = mem.open(mem.provision("d", tpm=False))
    assert dev.update().outcome == "updated"
    _plant_old_image(mem, dev)
    assert dev.boot().version == "1.0.0"


def test_power_cut_after_raising_the_floor_then_resume(mem: Mem) -> None:
    def cut(action: Action) -> None:
        if action.name == "raise_floor":
            raise PowerCut(action.name)

    path = mem.provision("d")
    with pytest.raises(PowerCut):
        mem.open(path, after=cut).update()
    mem.tpm.restart()  # the TPM loses power too
    dev = mem.open(path)
    dev.boot()
    result = dev.update()
    assert result.outcome == "updated" and result.to_version == "1.1.0"
    assert tpm_of(dev).read_tpm() == (V("1.1.0-0"), 1)
    assert dev.status().floor == Floor(V("1.1.0"), 1)


def test_power_cut_between_the_tpm_and_the_file_then_resume(
    mem: Mem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TPM was raised but the file write never happened: the TPM holds; resume fixes it."""
    path = mem.provision("d")

    def cut(_self: FileMonotonicStore, _floor: Floor) -> None:
        raise PowerCut("file write")

    with monkeypatch.context() as m:
        m.setattr(FileMonotonicStore, "_write", cut)
        with pytest.raises(PowerCut):
            mem.open(path).update()
    dev = mem.open(path)
    assert dev.status().floor == Floor(V("1.1.0-0"), 1)
    dev.boot()
    assert dev.update().outcome == "updated"
    assert dev.status().floor == Floor(V("1.1.0"), 1)


def test_cli_device_init_with_tpm(mem: Mem) -> None:
    from otaguard.cli import main

    rc = main(
        [
            "device",
            "init",
            str(mem.tmp / "cli-dev"),
            "--serial",
            "cli-dev",
            "--server",
            "https://repo.invalid",
            "--root",
            str(mem.repo.metadata_dir / "root.json"),
            "--ca",
            str(mem.ca),
            "--hardware-id",
            HW,
            "--factory-image",
            str(mem.image("1.0.0")),
            "--factory-version",
            "1.0.0",
            "--factory-security-counter",
            "2",
            "--unsafe-no-health-check",
            "--tpm",
            mem.tpm.tcti,
        ]
    )
    assert rc == 0
    dev = mem.open(mem.tmp / "cli-dev")
    assert dev.config.tpm == mem.tpm.tcti
    assert tpm_of(dev).read_tpm() == (V("1.0.0-0"), 2)


def test_a_refused_tpm_provisioning_leaves_no_device_directory(mem: Mem) -> None:
    mem.provision("first")
    tpm_of(mem.open(mem.tmp / "first")).raise_to(V("1.1.0"), 1)
    with pytest.raises(ConfigError, match="cannot provision"):
        mem.provision("second")  # same TPM, factory floor 1.0.0 below its counters
    assert not (mem.tmp / "second").exists()
