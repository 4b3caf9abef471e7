"""A valid CycloneDX 1.6 SBOM beside a test image: every release needs one."""

from __future__ import annotations

from pathlib import Path

from otaguard.sim.sbom import make_sbom

__all__ = ["sbom_beside"]


def sbom_beside(image: Path) -> Path:
    """Write (once) ``<image>.cdx.json`` describing the image, and return its path.

    The firmware version is read from a name like ``fw-1.1.0.img`` (the tests' images), so
    the components follow it (:func:`otaguard.sim.sbom.firmware_components`).
    """
    path = Path(f"{image}.cdx.json")
    if not path.exists():
        name, _, version = Path(image).stem.rpartition("-")
        if not name or not version[:1].isdigit():
            name, version = Path(image).stem, "1.0.0"
        make_sbom(path, name=name, version=version)
    return path
