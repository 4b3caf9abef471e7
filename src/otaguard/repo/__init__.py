"""Image repository tooling: build, sign and verify metadata (no HTTP)."""

from otaguard.repo.ceremony import (
    SigningRequest,
    publish_request,
    sign_request,
    stage_release,
)
from otaguard.repo.keyspec import ExternalKey, RoleKeySpec
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
    "OFFLINE_ROLES",
    "ONLINE_ROLES",
    "ROLE_ALGORITHMS",
    "ExternalKey",
    "FileSource",
    "ImageRepository",
    "KeyRef",
    "OfflineRoles",
    "Release",
    "RoleCheck",
    "RoleKeySpec",
    "SigningRequest",
    "TargetCheck",
    "VerificationReport",
    "VerifiedRepository",
    "check_repository",
    "publish_request",
    "sign_request",
    "stage_release",
    "verify_offline_roles",
    "verify_update",
]
