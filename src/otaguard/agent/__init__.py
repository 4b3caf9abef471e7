"""The device agent: verification, download, atomic A/B install, simulated boot."""

from otaguard.agent.boot import RECOVERY, BootRecord, boot
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.device import Device, DeviceStatus, MarkGoodResult, UpdateResult
from otaguard.agent.fetcher import Fetcher, TlsFetcher, create_ssl_context
from otaguard.agent.install import InstallState, Observation, Phase, transition
from otaguard.agent.installer import FAULT_ENV, Installer
from otaguard.agent.monotonic import FileMonotonicStore, Floor, MonotonicStore
from otaguard.agent.slots import BootEnv, FileSlots, SlotBackend, SlotImage
from otaguard.agent.updater import Offer, Selection, TufSession, select_update

__all__ = [
    "FAULT_ENV",
    "RECOVERY",
    "BootEnv",
    "BootRecord",
    "Device",
    "DeviceConfig",
    "DevicePaths",
    "DeviceStatus",
    "Fetcher",
    "FileMonotonicStore",
    "FileSlots",
    "Floor",
    "InstallState",
    "Installer",
    "MarkGoodResult",
    "MonotonicStore",
    "Observation",
    "Offer",
    "Phase",
    "Selection",
    "SlotBackend",
    "SlotImage",
    "TlsFetcher",
    "TufSession",
    "UpdateResult",
    "boot",
    "create_ssl_context",
    "select_update",
    "transition",
]
