"""Rich renderings of library results. Presentation only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from otaguard.agent import DeviceStatus, Selection
from otaguard.cli._output import emit_table, jsonable

if TYPE_CHECKING:
    # release tooling: a device's install (otaguard[agent]) renders its status without it
    from otaguard.repo import Release, TargetCheck, VerificationReport

__all__ = [
    "release_rows",
    "render_releases",
    "render_selection",
    "render_status",
    "render_verification",
    "status_document",
]


def render_verification(
    console: Console, report: VerificationReport, checks: list[TargetCheck]
) -> None:
    """Table of every role and target checked by ``repo verify``."""
    rows: list[list[str]] = []
    for name in ("root", "targets", "snapshot", "timestamp"):
        c = report.roles.get(name)
        if c is None or not (c.checked or c.problem):
            rows.append([name, "-", "-", "-", "-", "not checked"])
            continue
        if c.problem:
            # The row already names role and file; show python-tuf's reason.
            result = c.problem.removeprefix(f"{name} {c.file}: ") if c.file else c.problem
        else:
            result = c.note or "ok"
        rows.append(
            [
                name,
                c.file or "-",
                str(c.version) if c.version is not None else "-",
                f"{c.signed}/{c.threshold}" if c.threshold is not None else "-",
                f"{c.expires:%Y-%m-%d %H:%M}" if c.expires else "-",
                result,
            ]
        )
    for t in checks:
        rows.append(["target", t.path, "", "", "", "hash ok" if t.ok else (t.problem or "")])
    emit_table(
        console,
        title="Repository verification",
        columns=("item", "file", "version", "signatures", "expires (UTC)", "result"),
        rows=rows,
    )
    for p in report.all_problems():
        console.print(f"[red]problem:[/red] {escape(p)}")


def release_rows(releases: list[Release]) -> list[dict[str, Any]]:
    """Published releases as JSON objects (``release list --json``)."""
    return [
        {
            "target": r.path,
            "version": str(r.info.version),
            "release_type": r.info.release_type,
            "security_counter": r.info.security_counter,
            "hardware_ids": list(r.info.hardware_ids),
            "length": r.length,
        }
        for r in releases
    ]


def render_releases(console: Console, releases: list[Release]) -> None:
    """Table of published releases."""
    emit_table(
        console,
        title="Releases",
        columns=("target", "version", "type", "security counter", "hardware ids", "bytes"),
        rows=[
            [
                r.path,
                str(r.info.version),
                r.info.release_type,
                str(r.info.security_counter),
                ", ".join(r.info.hardware_ids),
                f"{r.length:,}",
            ]
            for r in releases
        ],
    )


def render_selection(console: Console, running: str, sel: Selection) -> None:
    """What ``agent check`` found."""
    if sel.chosen is None:
        console.print(f"running {running}: no update to install")
    else:
        o = sel.chosen
        console.print(
            f"running {running}: would install [bold]{o.path}[/bold] version {o.info.version} "
            f"({o.info.release_type}, security counter {o.info.security_counter}, "
            f"{o.target.length:,} bytes)"
        )
    for path, why in sel.refused:
        console.print(f"[yellow]refused[/yellow] {path}: {why}")


def _slot_roles(st: DeviceStatus, slot: str) -> list[str]:
    roles = []
    if slot == st.bootenv.primary:
        roles.append("primary")
    if slot == st.bootenv.try_slot:
        roles.append(f"try ({st.bootenv.tries_left} left)")
    if st.booted and st.booted.slot == slot:
        roles.append("booted")
    return roles


def status_document(st: DeviceStatus) -> dict[str, Any]:
    """A device's status as one JSON object (``agent status --json``): full digests."""
    return {
        "hardware_id": st.hardware_id,
        "slots": {
            slot: {
                "roles": _slot_roles(st, slot),
                "image": jsonable(image),
            }
            for slot, image in st.bootenv.slots.items()
        },
        "primary": st.bootenv.primary,
        "try_slot": st.bootenv.try_slot,
        "tries_left": st.bootenv.tries_left,
        "booted": jsonable(st.booted),
        "floor": {
            "version": str(st.floor.version),
            "security_counter": st.floor.security_counter,
        },
        "install_phase": st.install.phase.value,
        "last_result": jsonable(st.install.last_result),
    }


def render_status(console: Console, st: DeviceStatus) -> None:
    """Slots, versions, counters and the last result of a device."""
    rows: list[list[str]] = []
    for slot, image in st.bootenv.slots.items():
        roles = ", ".join(_slot_roles(st, slot))
        if image is None:
            rows.append([slot, roles, "-", "-", "(empty or invalid)", "-", "-"])
        else:
            rows.append(
                [
                    slot,
                    roles,
                    image.version,
                    str(image.security_counter),
                    image.target,
                    # piped: the whole digest; on a terminal the table folds it
                    image.sha256,
                    # the installed SBOM, verified with the image (none: installed before SBOMs)
                    image.sbom_sha256 or "-",
                ]
            )
    emit_table(
        console,
        title=f"Device ({st.hardware_id})",
        columns=("slot", "role", "version", "security counter", "target", "sha256", "SBOM sha256"),
        rows=rows,
    )
    if st.booted is not None and st.booted.recovery:
        console.print(f"[red]booted into recovery[/red]: {st.booted.note}", highlight=False)
    console.print(
        f"anti-rollback floor: version {st.floor.version}, security counter "
        f"{st.floor.security_counter}"
    )
    console.print(f"install phase: {st.install.phase.value}")
    last = st.install.last_result
    if last:
        console.print(
            f"last result: {last.get('outcome')} {last.get('target', '')} at {last.get('time', '')}"
            f" — {last.get('detail', '')}"
        )
    else:
        console.print("last result: none")
