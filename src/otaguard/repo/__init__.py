"""Image repository tooling: build, sign and verify metadata (no HTTP)."""

from otaguard.repo.repository import (
    DEFAULT_EXPIRY_DAYS,
    ROLE_ALGORITHMS,
    ImageRepository,
    Release,
    TargetCheck,
)
from otaguard.repo.verify import RoleCheck, VerificationReport, check_metadata, verify_published

__all__ = [
    "DEFAULT_EXPIRY_DAYS",
    "ROLE_ALGORITHMS",
    "ImageRepository",
    "Release",
    "RoleCheck",
    "TargetCheck",
    "VerificationReport",
    "check_metadata",
    "verify_published",
]
