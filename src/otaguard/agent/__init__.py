"""The device agent: verification, download, atomic A/B install, simulated boot."""

from otaguard.agent.boot import BootRecord, boot
from otaguard.agent.config import DeviceConfig, DevicePaths
from otaguard.agent.device import Device, DeviceStatus, UpdateResult
from otaguard.agent.fetcher import Fetcher, TlsFetcher, create_ssl_context
from otaguard.agent.install import FAULT_ENV, Installer, InstallState, Phase, Step, next_step
from otaguard.agent.monotonic import FileMonotonicStore, Floor, MonotonicStore
from otaguard.agent.slots import BootEnv, FileSlots, SlotBackend, SlotImage
from otaguard.agent.updater import Offer, Selection, TufSession, select_update

__all__ = [
    "FAULT_ENV",
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
    "MonotonicStore",
    "Offer",
    "Phase",
    "Selection",
    "SlotBackend",
    "SlotImage",
    "Step",
    "TlsFetcher",
    "TufSession",
    "UpdateResult",
    "boot",
    "create_ssl_context",
    "next_step",
    "select_update",
]
