"""``sbom show`` (a release's components, from the repository) and ``sbom find`` (which
releases, and which devices running them, contain a component: the server's index)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from otaguard.cli._cli import out
from otaguard.model.errors import OperatorError

__all__ = ["add_sbom_parsers", "split_component"]


def split_component(text: str) -> tuple[str, str | None]:
    """``NAME[@VERSION]`` → (name, version). A purl (``pkg:…``) keeps its own ``@``.

    Raises:
        OperatorError: empty name or version.
    """
    text = text.strip()
    if text.startswith("pkg:"):
        return text, None
    name, sep, version = text.rpartition("@") if "@" in text else (text, "", "")
    if not name or (sep and not version):
        raise OperatorError(f"invalid component {text!r}: NAME, NAME@VERSION or a purl")
    return name, version or None


def _show(a: argparse.Namespace) -> int:
    from otaguard.repo import ImageRepository

    repo = ImageRepository(a.repo_dir)
    release, sbom = repo.release_sbom(a.version)
    ref = release.info.sbom
    assert ref is not None  # noqa: S101 - release_sbom refuses a release without one
    table = Table(title=f"{release.path}: CycloneDX {sbom.spec_version}, sha256 {ref.sha256}")
    for col in ("name", "version", "purl", "type"):
        table.add_column(col)
    for c in sbom.components:
        table.add_row(c.name, c.version or "", c.purl or "", c.type)
    out.print(table)
    out.print(f"{len(sbom.components)} components", highlight=False)
    return 0


def _find(a: argparse.Namespace) -> int:
    from otaguard.cli._ops import remote_args
    from otaguard.server.sbom_client import SbomClient

    name, version = split_component(a.component)
    server, ca, token = remote_args(a)
    with SbomClient(server_url=server, ca_cert=ca, token=token) as client:
        found = client.find(name, version=version)
    if not found.releases:
        out.print(f"no release contains {a.component}", markup=False)
        return 0
    table = Table(title=f"releases containing {a.component}")
    for col in ("release", "target", "component", "version", "purl", "devices running it"):
        table.add_column(col)
    for r in found.releases:
        devices = [d.serial for d in found.devices if d.target == r.target]
        table.add_row(
            r.release, r.target, r.name, r.version or "", r.purl or "", ", ".join(devices) or "-"
        )
    out.print(table)
    out.print(
        f"{len(found.releases)} release(s), {len(found.devices)} device(s) running them",
        highlight=False,
    )
    return 0


def add_sbom_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sbom show`` and ``sbom find``."""
    from otaguard.cli._ops import remote_options

    sb = sub.add_parser("sbom", help="software bills of materials of releases").add_subparsers(
        dest="sbom_cmd", required=True
    )
    show = sb.add_parser("show", help="list a release's SBOM components (from the repository)")
    show.add_argument("repo_dir", type=Path)
    show.add_argument("version", help="release version X.Y.Z")
    show.set_defaults(func=_show)
    find = sb.add_parser(
        "find", help="releases containing a component, and the devices running them (server)"
    )
    find.add_argument("component", help="NAME, NAME@VERSION or a purl (pkg:…)")
    remote_options(find)
    find.set_defaults(func=_find)
