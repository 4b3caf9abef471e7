"""``vuln import`` (OSV JSON or CycloneDX VEX, parsed here and again by the server),
``vuln affected ID`` and ``vuln report`` (exposure and time-to-patch per device)."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from pathlib import Path

from rich.table import Table

from otaguard.cli._cli import out
from otaguard.cli._output import add_json_option, emit_json, jsonable
from otaguard.model.errors import OperatorError

__all__ = ["REPORT_COLUMNS", "add_vuln_parsers"]

#: the report's CSV header (and the keys of each JSON row)
REPORT_COLUMNS = (
    "vuln_id", "serial", "release", "status", "affected_since", "patched_at", "patched_to",
    "time_to_patch_seconds",
)  # fmt: skip


def _read(path: Path) -> bytes:
    from otaguard.model.vuln import MAX_VULN_FILE_BYTES

    try:
        with path.open("rb") as f:
            return f.read(MAX_VULN_FILE_BYTES + 1)
    except OSError as e:
        raise OperatorError(f"cannot read {path}: {e.strerror}") from e


def _import(a: argparse.Namespace) -> int:
    from otaguard.cli._ops import remote_args
    from otaguard.model.vuln import parse_vulnerabilities
    from otaguard.server.vuln_client import VulnClient

    data = _read(a.file)
    vulns = parse_vulnerabilities(data)  # a bad file stops here: one line, exit 2
    server, ca, token = remote_args(a)
    with VulnClient(server_url=server, ca_cert=ca, token=token) as client:
        done = client.import_document(json.loads(data))
    for vid, new in done:
        out.print(f"{vid}: {'imported' if new else 'updated'}", markup=False, highlight=False)
    packages = sum(len(v.affected) for v in vulns)
    out.print(f"{len(done)} vulnerability(ies), {packages} package(s)", highlight=False)
    return 0


def _affected(a: argparse.Namespace) -> int:
    from otaguard.cli._ops import remote_args
    from otaguard.server.vuln_client import VulnClient

    server, ca, token = remote_args(a)
    with VulnClient(server_url=server, ca_cert=ca, token=token) as client:
        found = client.affected(a.id)
    if a.json:
        emit_json(found)
        return 0
    out.print(f"{found.id}: {found.summary or '(no summary)'}", markup=False, highlight=False)
    table = Table(title=f"releases affected by {found.id}")
    for col in ("release", "target", "component", "version", "devices running it"):
        table.add_column(col)
    for r in found.releases:
        devices = [d.serial for d in found.devices if d.target == r.target]
        table.add_row(
            r.version, r.target, r.component, r.component_version or "", ", ".join(devices) or "-"
        )
    out.print(table)
    fixes = ", ".join(f"{f.version} ({f.component_version})" for f in found.fixed_by)
    out.print(f"fixed by: {fixes or 'no release yet'}", markup=False, highlight=False)
    out.print(
        f"{len(found.releases)} release(s) affected, {len(found.devices)} device(s) running them",
        highlight=False,
    )
    return 0


def _report(a: argparse.Namespace) -> int:
    from otaguard.cli._ops import remote_args
    from otaguard.server.vuln_client import VulnClient

    server, ca, token = remote_args(a)
    with VulnClient(server_url=server, ca_cert=ca, token=token) as client:
        rows, truncated = client.report()

    def cell(value: object) -> object:
        return jsonable(value) if isinstance(value, dt.datetime) else value

    records = [
        dict(
            zip(
                REPORT_COLUMNS,
                (
                    r.vuln_id, r.serial, r.target, "exposed" if r.patched_at is None else "patched",
                    cell(r.affected_since), cell(r.patched_at), r.patched_to,
                    r.time_to_patch_seconds,
                ),
                strict=True,
            )
        )
        for r in rows
    ]  # fmt: skip
    if a.format == "json":
        emit_json({"exposures": records, "truncated": truncated})
    else:
        writer = csv.DictWriter(sys.stdout, fieldnames=REPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        sys.stdout.flush()
    if truncated:
        print(
            "warning: the server cut the check-in history; the report is partial", file=sys.stderr
        )
    return 0


def add_vuln_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``vuln import``, ``vuln affected`` and ``vuln report``."""
    from otaguard.cli._ops import remote_options

    vp = sub.add_parser(
        "vuln", help="vulnerability response: advisories matched against release SBOMs"
    ).add_subparsers(dest="vuln_cmd", required=True)
    imp = vp.add_parser(
        "import", help="import OSV JSON (a record or a list) or CycloneDX VEX (operator)"
    )
    imp.add_argument("file", type=Path)
    remote_options(imp)
    imp.set_defaults(func=_import)
    aff = vp.add_parser(
        "affected", help="releases and devices a vulnerability affects, and its fixes (viewer)"
    )
    aff.add_argument("id", help="the vulnerability id (e.g. CVE-2024-5535, GHSA-…, OSV-…)")
    remote_options(aff)
    add_json_option(aff)
    aff.set_defaults(func=_affected)
    rep = vp.add_parser(
        "report", help="per vulnerability and device: affected since, patched at, time to patch"
    )
    rep.add_argument("--format", choices=("csv", "json"), default="csv")
    remote_options(rep)
    rep.set_defaults(func=_report)
