"""Image repository tooling: build, sign and verify metadata (no HTTP)."""

from otaguard.repo.repository import (
    DEFAULT_EXPIRY_DAYS,
    OFFLINE_ROLES,
    ONLINE_ROLES,
    ROLE_ALGORITHMS,
    ImageRepository,
    KeyRef,
    Release,
    TargetCheck,
)
from otaguard.repo.verify import RoleCheck, VerificationReport, check_metadata, verify_published

__all__ = [
    "DEFAULT_EXPIRY_DAYS",
    "OFFLINE_ROLES",
    "ONLINE_ROLES",
    "ROLE_ALGORITHMS",
    "ImageRepository",
    "KeyRef",
    "Release",
    "RoleCheck",
    "TargetCheck",
    "VerificationReport",
    "check_metadata",
    "verify_published",
]
