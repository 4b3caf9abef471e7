"""Small, valid CycloneDX 1.6 JSON SBOMs for the demo, the simulator, benchmarks and tests.

Real releases get theirs from the build (Yocto's ``create-spdx``/cyclonedx classes, syft,
cyclonedx-py); the simulated firmware needs one too, since every release must carry an
SBOM. The components depend on the version, so "which devices run a vulnerable X" has an
answer that changes from release to release (OpenSSL is fixed in 1.1.0 here).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Final

__all__ = ["VULNERABLE_OPENSSL", "firmware_components", "make_sbom"]

#: the OpenSSL version the simulated 1.0.0 firmware ships (and 1.1.0 replaces)
VULNERABLE_OPENSSL: Final = "3.0.13"


def firmware_components(version: str) -> list[dict[str, Any]]:
    """The simulated firmware's components: busybox, zlib, and OpenSSL fixed after 1.0.0."""
    openssl = VULNERABLE_OPENSSL if version.startswith("1.0.") else "3.0.15"
    packages = [("busybox", "1.36.1"), ("zlib", "1.3.1"), ("openssl", openssl)]
    return [
        {
            "type": "library",
            "bom-ref": f"pkg:generic/{name}@{v}",
            "name": name,
            "version": v,
            "purl": f"pkg:generic/{name}@{v}",
        }
        for name, v in packages
    ]


def make_sbom(
    path: Path,
    *,
    name: str,
    version: str,
    components: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a CycloneDX 1.6 JSON SBOM for firmware ``name`` ``version`` to ``path``.

    The serial number is derived from name and version, so the same release always gets
    the same bytes (reproducible builds, stable test vectors).
    """
    doc = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'otaguard:{name}:{version}')}",
        "version": 1,
        "metadata": {
            "component": {"type": "firmware", "name": name, "version": version},
        },
        "components": firmware_components(version) if components is None else components,
    }
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return Path(path)
