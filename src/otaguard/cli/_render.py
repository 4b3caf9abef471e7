"""Rich renderings of library results. Presentation only."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from otaguard.agent import DeviceStatus, Selection
from otaguard.repo import Release, TargetCheck, VerificationReport

__all__ = ["render_releases", "render_selection", "render_status", "render_verification"]


def render_verification(
    console: Console, report: VerificationReport, checks: list[TargetCheck]
) -> None:
    """Table of every role and target checked by ``repo verify``."""
    table = Table(title="Repository verification")
    for col in ("item", "version", "signatures", "expires (UTC)", "result"):
        table.add_column(col)
    for name in ("root", "targets", "snapshot", "timestamp"):
        c = report.roles.get(name)
        if c is None:
            table.add_row(name, "-", "-", "-", "[red]not checked[/red]")
            continue
        if c.ok and c.version is None:  # server mode: the update server signs this role
            table.add_row(name, "-", "-", "-", "server-signed")
            continue
        result = "[green]ok[/green]" if c.ok else "[red]" + "; ".join(c.problems) + "[/red]"
        expires = f"{c.expires:%Y-%m-%d %H:%M}" if c.expires else "-"
        table.add_row(name, str(c.version or "-"), f"{c.signed}/{c.threshold}", expires, result)
    for t in checks:
        result = "[green]hash ok[/green]" if t.ok else f"[red]{t.problem}[/red]"
        table.add_row(f"target {t.path}", "", "", "", result)
    console.print(table)
    for p in report.problems:
        console.print(f"[red]problem:[/red] {p}")


def render_releases(console: Console, releases: list[Release]) -> None:
    """Table of published releases."""
    table = Table(title="Releases")
    for col in ("target", "version", "type", "security counter", "hardware ids", "bytes"):
        table.add_column(col)
    for r in releases:
        table.add_row(
            r.path,
            str(r.info.version),
            r.info.release_type,
            str(r.info.security_counter),
            ", ".join(r.info.hardware_ids),
            f"{r.length:,}",
        )
    console.print(table)


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


def render_status(console: Console, st: DeviceStatus) -> None:
    """Slots, versions, counters and the last result of a device."""
    table = Table(title=f"Device ({st.hardware_id})")
    for col in ("slot", "role", "version", "security counter", "target", "sha256"):
        table.add_column(col)
    for slot, image in st.bootenv.slots.items():
        roles = []
        if slot == st.bootenv.primary:
            roles.append("primary")
        if slot == st.bootenv.try_slot:
            roles.append(f"try ({st.bootenv.tries_left} left)")
        if st.booted and st.booted.slot == slot:
            roles.append("booted")
        if image is None:
            table.add_row(slot, ", ".join(roles), "-", "-", "(empty or invalid)", "-")
        else:
            table.add_row(
                slot,
                ", ".join(roles),
                image.version,
                str(image.security_counter),
                image.target,
                image.sha256[:16] + "…",
            )
    console.print(table)
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
