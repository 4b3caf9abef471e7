"""A valid CycloneDX 1.6 SBOM beside a test image: every release needs one."""

from __future__ import annotations

from pathlib import Path

from otaguard.sim.sbom import make_sbom

__all__ = ["sbom_beside"]


def sbom_beside(image: Path) -> Path:
    """Write (once) ``<image>.cdx.json`` describing the image, and return its path."""
    path = Path(f"{image}.cdx.json")
    if not path.exists():
        make_sbom(path, name=Path(image).stem, version="1.0.0")
    return path
