"""Image repository tooling: build, sign and verify metadata (no HTTP)."""

from otaguard.repo.repository import (
    DEFAULT_EXPIRY_DAYS,
    ROLE_ALGORITHMS,
    ImageRepository,
    Release,
    TargetCheck,
)
from otaguard.repo.verify import (
    FileSource,
    OfflineRoles,
    RoleCheck,
    VerificationReport,
    VerifiedRepository,
    check_repository,
    verify_offline_roles,
    verify_update,
)

__all__ = [
    "DEFAULT_EXPIRY_DAYS",
    "ROLE_ALGORITHMS",
    "FileSource",
    "ImageRepository",
    "OfflineRoles",
    "Release",
    "RoleCheck",
    "TargetCheck",
    "VerificationReport",
    "VerifiedRepository",
    "check_repository",
    "verify_offline_roles",
    "verify_update",
]
