"""Rich renderings of library results. Presentation only."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from otaguard.agent import DeviceStatus, Selection
from otaguard.repo import Release, TargetCheck, VerificationReport

__all__ = ["render_releases", "render_selection", "render_status", "render_verification"]


def render_verification(
    console: Console, report: VerificationReport, checks: list[TargetCheck]
) -> None:
    """Table of every role and target checked by ``repo verify``."""
    table = Table(title="Repository verification")
    for col in ("item", "file", "version", "signatures", "expires (UTC)", "result"):
        table.add_column(col)
    for name in ("root", "targets", "snapshot", "timestamp"):
        c = report.roles.get(name)
        if c is None or not (c.checked or c.problem):
            table.add_row(name, "-", "-", "-", "-", "[yellow]not checked[/yellow]")
            continue
        if c.problem:
            # The row already names role and file; show python-tuf's reason.
            reason = c.problem.removeprefix(f"{name} {c.file}: ") if c.file else c.problem
            result = f"[red]{escape(reason)}[/red]"
        elif c.note:
            result = f"[cyan]{escape(c.note)}[/cyan]"
        else:
            result = "[green]ok[/green]"
        table.add_row(
            name,
            escape(c.file or "-"),
            str(c.version) if c.version is not None else "-",
            f"{c.signed}/{c.threshold}" if c.threshold is not None else "-",
            f"{c.expires:%Y-%m-%d %H:%M}" if c.expires else "-",
            result,
        )
    for t in checks:
        result = "[green]hash ok[/green]" if t.ok else f"[red]{escape(t.problem or '')}[/red]"
        table.add_row("target", escape(t.path), "", "", "", result)
    console.print(table)
    for p in report.all_problems():
        console.print(f"[red]problem:[/red] {escape(p)}")


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
    for col in ("slot", "role", "version", "security counter", "target", "sha256", "SBOM sha256"):
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
            table.add_row(slot, ", ".join(roles), "-", "-", "(empty or invalid)", "-", "-")
        else:
            table.add_row(
                slot,
                ", ".join(roles),
                image.version,
                str(image.security_counter),
                image.target,
                image.sha256[:16] + "…",
                # the installed SBOM, verified with the image (none: installed before SBOMs)
                image.sbom_sha256[:16] + "…" if image.sbom_sha256 else "-",
            )
    console.print(table)
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
