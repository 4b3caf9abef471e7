"""Device configuration and directory layout."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from otaguard._fs import atomic_write_json
from otaguard.model.errors import ConfigError
from otaguard.model.names import check_device_serial

__all__ = [
    "HINT_MIN_INTERVAL_S",
    "MAX_CONFIG_BYTES",
    "MIN_HINT_INTERVAL_S",
    "MQTT_DEFAULT_PORT",
    "DeviceConfig",
    "DevicePaths",
    "FetchLimits",
    "parse_mqtt_url",
]

# A device config is a few hundred bytes; anything large is corrupt or hostile.
MAX_CONFIG_BYTES: Final = 64 * 1024
# A TCTI string names a driver and its options ("swtpm:host=127.0.0.1,port=2321",
# "device:/dev/tpmrm0"); printable, no spaces, and short enough to show in one line.
_TCTI: Final = re.compile(r"[a-z][a-z0-9-]{0,31}(:[!-~]{0,200})?")
#: MQTT over TLS (the only scheme: the broker takes the device certificate as identity)
MQTT_DEFAULT_PORT: Final = 8883
_MQTT_URL: Final = re.compile(
    r"mqtts://([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::([0-9]{1,5}))?/?"
)
#: a "check in now" hint makes at most one early check-in per this many seconds: a flood
#: of hints (a broken or hostile server, a replaying broker) cannot make the device
#: hammer the update server; a hint inside the window is kept for the window's end
HINT_MIN_INTERVAL_S: Final = 30.0
#: the lowest a device's configuration may set it (tests use a few seconds)
MIN_HINT_INTERVAL_S: Final = 1.0


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """``mqtts://HOST[:PORT]`` as (host, port); the port defaults to 8883.

    Raises:
        ConfigError: another scheme (plain ``mqtt://`` is refused), or a malformed URL.
    """
    m = _MQTT_URL.fullmatch(url) if isinstance(url, str) else None
    port = int(m.group(2)) if m is not None and m.group(2) else MQTT_DEFAULT_PORT
    if m is None or not 0 < port < 65536:
        raise ConfigError(f"mqtt_url {url!r} must be mqtts://HOST[:PORT] (MQTT over TLS)")
    return m.group(1).strip("[]"), port


@dataclass(frozen=True)
class FetchLimits:
    """How long and how slowly the agent's fetcher lets a server answer.

    One place for the defaults, so every client of the agent's fetcher (the device and
    ``otaguard-conformance``) applies the same limits unless a device config says otherwise.
    """

    #: seconds one TCP connect attempt may take
    connect_timeout_s: float = 10.0
    #: seconds one socket read or write may wait (a stalled server or TLS handshake)
    read_timeout_s: float = 30.0
    #: per-download deadline = base + length / min rate (slow-retrieval defence)
    download_deadline_base_s: float = 60.0
    #: slowest transfer accepted: a 1 GiB image may take 60 s + 4.4 h at this rate
    download_min_rate_bps: int = 64 * 1024


_LIMITS: Final = FetchLimits()


@dataclass(frozen=True)
class DevicePaths:
    """Where a device keeps each piece of its state (all under one directory)."""

    root: Path

    @property
    def config(self) -> Path:
        """Device configuration (JSON)."""
        return self.root / "config.json"

    @property
    def trust(self) -> Path:
        """Trust anchors provisioned at manufacture."""
        return self.root / "trust"

    @property
    def trusted_root(self) -> Path:
        """The image repository's root metadata provisioned at manufacture."""
        return self.trust / "root.json"

    @property
    def director_root(self) -> Path:
        """The director's root metadata (provisioned at manufacture; rotations update it).

        Its absence means the device chooses its own update (no director; development).
        """
        return self.trust / "director-root.json"

    @property
    def attack_flags(self) -> Path:
        """What the device refused since its last accepted check-in (reported, then cleared)."""
        return self.root / "attack-flags.json"

    @property
    def next_nonce(self) -> Path:
        """The nonce the last accepted check-in handed out for the next one (ADR 0036)."""
        return self.root / "next-nonce.json"

    @property
    def ca(self) -> Path:
        """The CA certificate the server's TLS certificate must chain to."""
        return self.trust / "ca.pem"

    @property
    def identity(self) -> Path:
        """The device's TLS identity: its key and certificate chain."""
        return self.root / "identity"

    @property
    def device_key(self) -> Path:
        """The device key: a TPM-wrapped blob, or (development) a plain private key file."""
        return self.identity / "device.key"

    @property
    def device_key_next(self) -> Path:
        """A new key waiting for its certificate (enrollment and renewal in progress)."""
        return self.identity / "device.key.new"

    @property
    def device_cert(self) -> Path:
        """The device certificate followed by the issuing CA (PEM), from enrollment."""
        return self.identity / "device.pem"

    @property
    def metadata(self) -> Path:
        """ngclient's cache of verified metadata."""
        return self.root / "metadata"

    @property
    def staging(self) -> Path:
        """Downloads land here before they are verified and written to a slot."""
        return self.root / "staging"

    @property
    def slots(self) -> Path:
        """File-backed A/B slots."""
        return self.root / "slots"

    @property
    def bootenv(self) -> Path:
        """The boot environment shared by agent and bootloader."""
        return self.root / "bootenv.json"

    @property
    def monotonic(self) -> Path:
        """The anti-rollback floor (development backend)."""
        return self.root / "monotonic.json"

    @property
    def install_state(self) -> Path:
        """The install state machine's persisted state."""
        return self.root / "install-state.json"

    @property
    def event_log(self) -> Path:
        """The measured-boot event log (what each boot measured, per TPM reset epoch)."""
        return self.root / "measured-boot.json"

    @property
    def booted(self) -> Path:
        """What the (simulated) bootloader started; stands in for /proc/cmdline."""
        return self.root / "run" / "booted.json"

    @property
    def self_measured(self) -> Path:
        """Which kernel boot the agent last measured itself, and what (ADR 0038)."""
        return self.root / "run" / "self-measured.json"


@dataclass(frozen=True)
class DeviceConfig:
    """Settings of one device; validated on load."""

    server_url: str
    hardware_id: str
    #: the device's serial number: its identity towards the server (certificate CN).
    #: Set explicitly at provisioning (``device init --serial``), never derived.
    serial: str
    #: command run after booting a new slot; exit 0 means healthy
    health_command: list[str] | None = None
    #: development only: commit a new image as soon as it boots (warns on every use)
    unsafe_no_health_check: bool = False
    health_timeout_s: float = 60.0
    #: boots of a new slot before the bootloader gives up and rolls back
    max_boot_tries: int = 3
    poll_interval_s: float = 300.0
    #: +/- fraction of poll_interval so a fleet does not poll in lock-step
    poll_jitter: float = 0.2
    #: the fetcher's limits (:class:`FetchLimits` has the defaults and the reasons)
    connect_timeout_s: float = _LIMITS.connect_timeout_s
    read_timeout_s: float = _LIMITS.read_timeout_s
    download_deadline_base_s: float = _LIMITS.download_deadline_base_s
    download_min_rate_bps: int = _LIMITS.download_min_rate_bps
    #: a streaming install fsyncs the slot and records its progress after this many
    #: bytes: what a power cut or a dropped connection can cost to download again,
    #: against one fsync and one state write per checkpoint (measured here, 256 MiB
    #: streamed into a file slot: 0.53-0.66 s without checkpoints, 0.69-0.73 s every
    #: 32 MiB, 1.10-1.25 s every 8 MiB)
    resume_checkpoint_bytes: int = 32 * 1024 * 1024
    #: largest image a slot accepts; bigger targets are refused before download
    max_image_bytes: int = 4 * 1024**3
    #: development only: allow http:// server URLs
    insecure_http: bool = False
    #: TCTI of the TPM holding the anti-rollback floor (NV counters); ``None``: the
    #: development file store alone
    tpm: str | None = None
    #: development only: keep the identity key in a file although a TPM is configured (the
    #: TPM still holds the floor and attests the boot); warns on every use
    unsafe_file_device_key: bool = False
    #: block-device slots: {"A": "PARTLABEL=rootfs_a", "B": "/dev/mmcblk0p3"}; ``None``:
    #: file slots in the device directory (simulation and tests)
    slot_devices: dict[str, str] | None = None
    #: the real bootloader's environment (:mod:`otaguard.agent.bootcfg`); ``None``: the
    #: simulated bootloader (:mod:`otaguard.agent.boot`)
    bootloader: dict[str, Any] | None = None
    #: health is checked by systemd units ordered before boot-complete.target, and the new
    #: slot is committed by ``otaguard agent DIR mark-good`` (otaguard-mark-good.service)
    health_by_units: bool = False
    #: the MQTT broker (``mqtts://HOST[:PORT]``): telemetry goes there (HTTPS when it is
    #: unreachable) and "check in now" hints come from there; ``None``: HTTPS only
    mqtt_url: str | None = None
    #: the CA the broker's certificate must chain to; ``None``: the provisioned server CA
    #: (``trust/ca.pem``: the broker's certificate comes from the server's TLS CA)
    mqtt_ca: str | None = None
    #: at most one hint-triggered early check-in per this many seconds
    hint_min_interval_s: float = HINT_MIN_INTERVAL_S
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A hand-edited config can hold any JSON type: check types before using the values.
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if isinstance(value, bool) is not (bool in kinds) or not isinstance(value, kinds):
                raise ConfigError(
                    f"{name} must be of type {' or '.join(k.__name__ for k in kinds)}"
                )
        if not self.server_url.startswith(("https://", "http://")):
            raise ConfigError(f"server URL {self.server_url!r} must be https://")
        if self.server_url.startswith("http://") and not self.insecure_http:
            raise ConfigError("plain http:// server URL needs the insecure development mode")
        if not self.hardware_id:
            raise ConfigError("hardware id is empty")
        if self.tpm is not None and not (isinstance(self.tpm, str) and _TCTI.fullmatch(self.tpm)):
            raise ConfigError("tpm must be a TCTI string such as 'device:/dev/tpmrm0'")
        try:
            check_device_serial(self.serial)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if not 1 <= self.max_boot_tries <= 16:
            raise ConfigError("max_boot_tries must be between 1 and 16")
        self._check_device_keys()
        self._check_mqtt()
        if self.health_command is not None and (
            not isinstance(self.health_command, list)
            or not all(isinstance(a, str) for a in self.health_command)
            or not self.health_command
        ):
            raise ConfigError("health_command must be a non-empty list of strings")
        for name in (
            "poll_interval_s",
            "connect_timeout_s",
            "read_timeout_s",
            "health_timeout_s",
            "download_deadline_base_s",
            "download_min_rate_bps",
            "max_image_bytes",
            "resume_checkpoint_bytes",
        ):
            # `not x > 0` also refuses NaN, which a hand-edited JSON config can hold.
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")

    def _check_mqtt(self) -> None:
        """The broker's URL and CA, the hints' rate limit."""
        if self.mqtt_url is not None:
            parse_mqtt_url(self.mqtt_url)
        if self.mqtt_ca is not None and (not isinstance(self.mqtt_ca, str) or not self.mqtt_ca):
            raise ConfigError("mqtt_ca must be the path of a PEM CA certificate")
        if not self.hint_min_interval_s >= MIN_HINT_INTERVAL_S:
            raise ConfigError(f"hint_min_interval_s must be at least {MIN_HINT_INTERVAL_S:g}")

    def _check_device_keys(self) -> None:
        """How health is checked, the bootloader and the block-device slots."""
        health_ways = (
            self.health_command is not None,
            self.unsafe_no_health_check,
            self.health_by_units,
        )
        if sum(health_ways) != 1:
            raise ConfigError(
                "configure exactly one of health_command, health_by_units and the "
                "development option unsafe_no_health_check"
            )
        if self.health_by_units and self.bootloader is None:
            raise ConfigError("health_by_units needs a bootloader (mark-good confirms the slot)")
        if self.bootloader is not None:
            from otaguard.agent.bootcfg import BootloaderSpec  # validates, naming the key

            BootloaderSpec.parse(self.bootloader)
        if self.slot_devices is not None and (
            not isinstance(self.slot_devices, dict)
            or set(self.slot_devices) != {"A", "B"}
            or not all(isinstance(v, str) and v for v in self.slot_devices.values())
        ):
            raise ConfigError(
                'slot_devices must map "A" and "B" to a device, PARTLABEL= or PARTUUID='
            )

    @property
    def fetch_limits(self) -> FetchLimits:
        """This device's fetcher limits."""
        return FetchLimits(
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            download_deadline_base_s=self.download_deadline_base_s,
            download_min_rate_bps=self.download_min_rate_bps,
        )

    @classmethod
    def load(cls, path: Path) -> DeviceConfig:
        """Read and validate a config file.

        Raises:
            ConfigError: missing, unreadable, too large, not JSON or invalid values.
        """
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"device config {path} is too large")
            raw = json.loads(path.read_bytes())
        except FileNotFoundError as e:
            raise ConfigError(
                f"device config {path} is missing (run 'otaguard device init')"
            ) from e
        except OSError as e:
            raise ConfigError(f"cannot read device config {path}: {e.strerror}") from e
        except ValueError as e:
            raise ConfigError(f"device config {path} is corrupt: not valid JSON") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"device config {path} is corrupt: not a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(
                f"device config {path} has unknown keys: {', '.join(sorted(unknown))}"
            )
        try:
            return cls(**raw)
        except TypeError as e:
            raise ConfigError(f"device config {path} is invalid: {e}") from e

    def save(self, path: Path) -> None:
        """Write the config atomically."""
        atomic_write_json(path, asdict(self))


_NUMBER: Final = (int, float)
_FIELD_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "server_url": (str,),
    "hardware_id": (str,),
    "serial": (str,),
    "health_timeout_s": _NUMBER,
    "max_boot_tries": (int,),
    "poll_interval_s": _NUMBER,
    "poll_jitter": _NUMBER,
    "hint_min_interval_s": _NUMBER,
    "connect_timeout_s": _NUMBER,
    "read_timeout_s": _NUMBER,
    "download_deadline_base_s": _NUMBER,
    "download_min_rate_bps": _NUMBER,
    "max_image_bytes": (int,),
    "resume_checkpoint_bytes": (int,),
    "insecure_http": (bool,),
    "unsafe_no_health_check": (bool,),
    "unsafe_file_device_key": (bool,),
    "health_by_units": (bool,),
    "extra": (dict,),
}
