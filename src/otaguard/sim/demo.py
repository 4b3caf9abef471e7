"""``otaguard demo``: an update through the director, staged rollouts (completion and an
automatic halt), then eight attacks, all refused."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import random
import secrets
import shutil
import ssl
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from otaguard.agent.slots import BootEnv, FileSlots
from otaguard.crypto.signers import read_public_key
from otaguard.model.errors import (
    AccessDeniedError,
    DirectorMismatchError,
    DowngradeError,
    InsecureModeWarning,
    OperatorError,
    OtaguardError,
    VerificationError,
)
from otaguard.repo import ImageRepository, Release
from otaguard.repo.director import init_director
from otaguard.repo.transfer import TransferRequest
from otaguard.server import RunningServer, ServerSettings, init_data_dir, start_server_in_thread
from otaguard.server.client import FleetClient
from otaguard.sim.attacks import AttackOutcome, CompromisedServer, steal_key
from otaguard.sim.ceremony import HSM_KEY_NAME, ceremony_release, start_demo_token
from otaguard.sim.dashboard_hint import dashboard_line, serve_until_interrupted
from otaguard.sim.director_attacks import CompromisedDirector
from otaguard.sim.fleet import SIM_HEALTH_COMMAND, DeviceRun, Fleet, make_image, wait_served
from otaguard.sim.monitoring_demo import monitoring_demo, summary_rows
from otaguard.sim.rollout_demo import staged_rollouts
from otaguard.sim.sbom import make_sbom
from otaguard.sim.softtpm import SoftTpmPool, softtpm_missing

__all__ = ["run_demo"]

HARDWARE_ID: Final = "gateway-v1"
#: devices whose key lives in a software TPM (swtpm + abrmd each) where swtpm is installed:
#: enough to show it, few enough to keep the demo fast
TPM_DEVICES: Final = 3
IMAGE_SIZE: Final = 4 * 1024 * 1024
ATTACKS: Final = 8


def _update_fleet(
    console: Console, fleet: Fleet, title: str, moved: dict[str, int] | None = None
) -> list[DeviceRun]:
    """Update every device; ``moved`` gets the bytes each downloaded for its image."""
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        console=console,
        transient=False,
    ) as prog:
        tasks: dict[str, TaskID] = {}
        overall = prog.add_task(f"[bold]{title}", total=len(fleet.names))

        def on_progress(name: str, stage: str, n: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = prog.add_task(f"{name} stream+install", total=total)
            if stage == "downloaded":  # once per delta or compressed stream: its bytes
                if moved is not None:
                    moved[name] = moved.get(name, 0) + n
                return
            prog.advance(tasks[name], n)

        runs: list[DeviceRun] = []
        for run in fleet.update_all(progress=on_progress):
            runs.append(run)
            prog.advance(overall)
    return runs


def _security_fix(image: Path, *, seed: str) -> Path:
    """Patch ``image`` in place a few kilobytes' worth, as a security update would."""
    rng = random.Random(seed)  # noqa: S311 - deterministic demo content, not a secret
    data = bytearray(image.read_bytes())
    for _ in range(32):
        at = rng.randrange(len(data) - 512)
        data[at : at + 256] = rng.randbytes(256)
    image.write_bytes(bytes(data))
    return image


def _attack(
    console: Console,
    fleet: Fleet,
    name: str,
    expected: type[Exception],
    version: str,
) -> AttackOutcome:
    runs = fleet.update_all()
    versions = fleet.versions()
    refused = [r for r in runs if isinstance(r.error, expected) and versions[r.name] == version]
    reason = next((r.error.diagnostics() for r in runs if r.error is not None), "not refused!")
    outcome = AttackOutcome(name, len(refused), len(runs), reason)
    mark = "[green]refused[/green]" if outcome.ok else "[red]NOT REFUSED[/red]"
    console.print(f"  {mark} by {outcome.refused}/{outcome.total} devices: {reason}")
    for r in runs:  # what a device that did not refuse as expected did instead
        if r not in refused:
            console.print(f"  [red]{r.name}[/red] (runs {versions[r.name]}): {_what(r)}")
    return outcome


def _what(run: DeviceRun) -> str:
    """What one device's update did, in one line (the error, or the outcome and why)."""
    if run.error is not None:
        return run.error.diagnostics()
    if run.result is None:
        return "no result"
    return f"{run.result.outcome} ({run.result.detail or 'no detail'})"


def _corrupt_running_slots(console: Console, fleet: Fleet) -> AttackOutcome:
    """(e) Flip one byte of every device's running 1.1.0 slot, then power the devices on.

    The old 1.0.0 image is still on disk in the other slot, but below the anti-rollback
    floor: the bootloader must boot recovery instead, and the agent must reinstall a
    release at or above the floor.
    """
    console.rule("[bold]6e. Attack: one byte of every device's running slot flipped")
    reason = "not refused!"
    recovery: set[str] = set()
    for name in fleet.names:
        dev = fleet.device(name)
        if not isinstance(dev.backend, FileSlots):  # the demo's devices are simulated
            raise TypeError("the demo flips bytes in file-backed slots")
        slot = dev.backend.path(dev.status().bootenv.primary)
        with open(slot, "r+b") as f:
            f.seek(IMAGE_SIZE // 2)
            byte = f.read(1)
            f.seek(IMAGE_SIZE // 2)
            f.write(bytes([byte[0] ^ 0x01]))
        record = dev.boot()
        if record.recovery:
            recovery.add(name)
            reason = f"booted recovery, not the old 1.0.0 ({record.note.split(';')[0]})"
    runs = fleet.update_all()
    versions = fleet.versions()
    recovered = [
        r
        for r in runs
        if r.name in recovery
        and r.result is not None
        and r.result.outcome == "recovered"
        and versions[r.name] == "1.1.0"
    ]
    outcome = AttackOutcome("(e) corrupted running slot", len(recovered), len(runs), reason)
    mark = "[green]refused[/green]" if outcome.ok else "[red]NOT REFUSED[/red]"
    console.print(
        f"  {mark} by {outcome.refused}/{outcome.total} devices: {reason}; "
        "each reinstalled 1.1.0 from recovery"
    )
    return outcome


def _unidentified_clients(
    console: Console, server: RunningServer, fleet: Fleet, operator: FleetClient
) -> AttackOutcome:
    """(f) Neither an anonymous client nor a quarantined device gets metadata or images."""
    assert server.ca_cert is not None  # noqa: S101
    victim = fleet.device(fleet.names[0])
    operator.quarantine(victim.config.serial, "demo: behaves oddly")
    url = urlsplit(server.base_url)
    answers: list[tuple[int, bytes]] = []
    try:
        for identity in (None, (victim.paths.device_cert, victim.paths.device_key)):
            ctx = ssl.create_default_context(cafile=str(server.ca_cert))
            if identity is not None:
                ctx.load_cert_chain(str(identity[0]), str(identity[1]))
            conn = http.client.HTTPSConnection(
                url.hostname or "", url.port, context=ctx, timeout=10
            )
            try:
                conn.request("GET", "/metadata/timestamp.json")
                resp = conn.getresponse()
                answers.append((resp.status, resp.read()))
            finally:
                conn.close()
        agent_refused = False
        try:
            victim.check()
        except OtaguardError as e:
            agent_refused = "403" in str(e)
    finally:
        operator.release(victim.config.serial)
    refused = sum(1 for status, body in answers if status == 403 and b"signed" not in body)
    refused += agent_refused
    reasons = [json.loads(body).get("error", "?") for status, body in answers if status == 403]
    outcome = AttackOutcome(
        "(f) no or quarantined certificate", refused, 3, "; ".join(reasons) or "not refused!"
    )
    mark = "[green]refused[/green]" if outcome.ok else "[red]NOT REFUSED[/red]"
    console.print(f"  {mark} {outcome.refused}/{outcome.total} requests: {outcome.reason}")
    return outcome


def _compromised_director(
    console: Console,
    fleet: Fleet,
    director: CompromisedDirector,
    operator: FleetClient,
    *,
    listed: Release,
) -> AttackOutcome:
    """(h) The director's real online key instructs every device to install an image the
    image repository lacks, then a listed image with another hash: each device refuses
    both, reports attack flags at its next check-in, and the server records alerts."""
    evil = hashlib.sha256(b"malicious firmware").hexdigest()
    refusals: dict[str, int] = dict.fromkeys(fleet.names, 0)
    reason = "not refused!"
    for name, sha256, length in (
        ("firmware-7.7.7.img", evil, IMAGE_SIZE),
        (listed.path, evil, listed.length),
    ):
        director.instruct(name=name, length=length, sha256=sha256)
        runs = fleet.update_all()
        versions = fleet.versions()
        for r in runs:
            if isinstance(r.error, DirectorMismatchError) and versions[r.name] == "1.1.0":
                refusals[r.name] += 1
                reason = r.error.diagnostics()
    director.restore()
    fleet.update_all()  # the next check-in carries the attack flags; honest answer: none
    alerted = [
        name
        for name in fleet.names
        if any(
            kind == "attack" and "director-image-mismatch" in detail
            for _, kind, detail in operator.checkins(name).alerts
        )
    ]
    ok = sum(1 for name in fleet.names if refusals[name] == 2 and name in alerted)
    outcome = AttackOutcome("(h) compromised director", ok, len(fleet.names), reason)
    mark = "[green]refused[/green]" if outcome.ok else "[red]NOT REFUSED[/red]"
    console.print(
        f"  {mark} by {outcome.refused}/{outcome.total} devices (absent image and other hash, "
        f"each reported and alerted): {reason}"
    )
    return outcome


def _start_tpms(console: Console, directory: Path, count: int) -> SoftTpmPool | None:
    """Software TPMs behind abrmd for ``count`` devices, or None where that cannot run."""
    if count == 0:
        return None
    missing = softtpm_missing()
    if missing:
        console.print(f"[yellow]no TPM-backed devices: missing {', '.join(missing)}[/yellow]")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    pool = SoftTpmPool(directory, count)
    try:
        pool.start()
    except (RuntimeError, OSError) as e:
        console.print(f"[yellow]no TPM-backed devices: software TPM did not start: {e}[/yellow]")
        return None
    return pool


def _tampered_boot(
    console: Console, work: Path, fleet: Fleet, operator: FleetClient, *, file_keyed: list[str]
) -> AttackOutcome:
    """(g) An attacker on a device rewrites its running slot AND the slot's recorded digest,
    so the bootloader's own check passes; the boot measurement gives it away at check-in.

    The victim is a file-keyed device (its agent runs in this process, see sim/_child.py),
    not the first one, which attack (f) uses.
    """
    victim = fleet.device(file_keyed[-1])
    evil = make_image(work / "evil.img", size=IMAGE_SIZE, seed="evil")
    env = BootEnv.load(victim.paths.bootenv)
    image = env.slots[env.primary]
    assert image is not None  # noqa: S101 - every device runs 1.1.0 here
    victim.backend.write(env.primary, evil)
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()
    env.slots[env.primary] = dataclasses.replace(image, sha256=digest, length=IMAGE_SIZE)
    env.save(victim.paths.bootenv)
    booted = victim.boot()  # the bootloader is fooled: the digest it checks was rewritten
    reason = "not refused!"
    refused = 0
    try:
        victim.update()
    except AccessDeniedError as e:
        reason = e.diagnostics()
        shown = operator.show(victim.config.serial)
        alerts = operator.checkins(victim.config.serial).alerts
        refused = int(shown.status == "quarantined" and bool(alerts) and booted.slot is not None)
    outcome = AttackOutcome("(g) tampered boot", refused, 1, reason)
    mark = "[green]refused[/green]" if outcome.ok else "[red]NOT REFUSED[/red]"
    console.print(
        f"  {mark}: {victim.config.serial} booted sha256 {digest[:16]}… and was quarantined at "
        f"its next check-in, with an alert: {reason}"
    )
    return outcome


def _sbom(work: Path, version: str) -> Path:
    return make_sbom(work / f"firmware-{version}.cdx.json", name="firmware", version=version)


def _sbom_digest(release: Release) -> str:
    return release.info.sbom.sha256 if release.info.sbom is not None else "none"


def _sbom_reports(console: Console, fleet: Fleet, release: Release) -> int:
    """How many devices report running ``release`` with the SBOM digest its signed target
    binds (from the booted slot's record, which their signed manifests carry); printed
    grouped by the digest each device reports."""
    reported: dict[str | None, list[str]] = {}
    ok = 0
    for name in fleet.names:
        status = fleet.device(name).status()
        image = status.bootenv.slots.get(status.bootenv.primary)
        digest = image.sbom_sha256 if image is not None else None
        on_release = image is not None and image.target == release.path
        ok += on_release and digest == _sbom_digest(release)
        reported.setdefault(digest if on_release else None, []).append(name)
    for digest, names in reported.items():
        match = digest == _sbom_digest(release)
        mark = (
            f"[green]= the signed {release.info.version} target's[/green]"
            if match
            else "[red]DIFFERS[/red]"
        )
        console.print(f"  {len(names)} device(s) report SBOM sha256 {digest} {mark}: "
                      f"{', '.join(names)}")  # fmt: skip
    return ok


def run_demo(
    *, devices: int, workdir: Path | None, console: Console, keep_serving: bool = False
) -> bool:
    """Run the whole demo; True when every device updated and every attack was refused.

    With ``keep_serving``, the server stays up after the attacks (for the dashboard)
    until Ctrl-C."""
    if devices < 1:
        raise OperatorError("--devices must be at least 1")
    cleanup = workdir is None
    work = Path(tempfile.mkdtemp(prefix="otaguard-demo-")) if workdir is None else Path(workdir)
    if work.exists() and any(work.iterdir()) and not cleanup:
        raise OperatorError(f"{work} is not empty; give the demo a new directory")
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(console, work, devices, keep_serving=keep_serving)
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)


def _run(  # noqa: PLR0912, PLR0915 - a linear script
    console: Console, work: Path, count: int, *, keep_serving: bool = False
) -> bool:
    step: Callable[[str], None] = lambda s: console.rule(f"[bold]{s}")  # noqa: E731
    # Keys are encrypted even in the demo, each with its own passphrase.
    passphrases: dict[str, bytes] = {}

    def passphrase(name: str) -> bytes:
        return passphrases.setdefault(name, secrets.token_urlsafe(24).encode())

    console.print(f"working directory: {work}")

    step("1. Update server's data directory: its online snapshot/timestamp key")
    paths = init_data_dir(work / "server")
    console.print(f"online public key: {paths.online_public_key}")

    step("2. Offline repository: hybrid Ed25519 + ML-DSA-65 root and targets keys")
    token = start_demo_token(work / "softhsm")
    if token is not None:
        passphrases[HSM_KEY_NAME] = token.pin.encode()
    repo = ImageRepository.init(
        work / "repo",
        keys_dir=work / "offline-keys",
        passphrases=passphrase,
        online_key=read_public_key(paths.online_public_key),
        key_specs={"targets": token.key_spec} if token is not None else None,
    )
    console.print(f"private keys in {repo.keys_dir}, none in {repo.dir}")
    if token is not None:
        console.print(f"targets 2 of 3: a third key, {HSM_KEY_NAME}, made inside a SoftHSM2 token")
    else:
        console.print("[yellow]softhsm2 not installed: targets keys are the hybrid pair[/yellow]")
    v100 = make_image(work / "firmware.img", size=IMAGE_SIZE, seed="1.0.0")
    # Every release goes through the offline ceremony, each with its CycloneDX SBOM.
    rel100, signed_by = ceremony_release(
        repo, v100, version="1.0.0", hardware_id=HARDWARE_ID, security=False,
        passphrase=passphrase, request=work / "1.0.0.request.json", sbom=_sbom(work, "1.0.0"),
    )  # fmt: skip
    console.print(
        f"released {rel100.path} (feature, counter {rel100.info.security_counter}), signed by "
        f"{' and '.join(signed_by)}; SBOM sha256 {_sbom_digest(rel100)}"
    )

    step("2b. Offline director root: hybrid root keys, naming the server's director key")
    director_root = init_director(
        work / "director",
        keys_dir=work / "director-keys",
        passphrases=passphrase,
        online_key=read_public_key(paths.director_public_key),
    )
    console.print(f"director root for devices: {director_root}")

    step("3. Update server (HTTPS; signs snapshot, timestamp and each device's instruction)")
    server = start_server_in_thread(
        ServerSettings(
            data_dir=paths.data_dir,
            repo_dir=repo.dir,
            host="127.0.0.1",
            port=0,
            director_dir=work / "director",
        )
    )
    attacker = None
    operator: FleetClient | None = None
    tpms: SoftTpmPool | None = None
    try:
        assert server.ca_cert is not None  # noqa: S101
        wait_served(server, repo)
        console.print(f"serving {server.base_url}")
        console.print(dashboard_line(server), markup=False, highlight=False)

        step(f"4. Register, provision and enroll {count} devices at 1.0.0")
        # The first device stays file-keyed: attack (f) presents its key from this process.
        tpm_names = [
            f"device-{i:02d}" for i in range(count - min(TPM_DEVICES, count - 1) + 1, count + 1)
        ]
        tpms = _start_tpms(console, work / "tpm", len(tpm_names))
        tctis = dict(zip(tpm_names, tpms.tctis if tpms else [], strict=False))
        console.print(
            "[yellow]file device keys are the development key store; "
            "their per-use warnings are silenced in the demo[/yellow]"
        )
        warnings.filterwarnings(
            "ignore", message=".*keeps its identity key in a file.*", category=InsecureModeWarning
        )
        operator = FleetClient(
            server_url=server.base_url, ca_cert=server.ca_cert, token=server.operator_token
        )
        fleet = Fleet.provision(
            work / "devices",
            count=count,
            server_url=server.base_url,
            root_json=repo.metadata_dir / "root.json",
            ca_pem=server.ca_cert,
            hardware_id=HARDWARE_ID,
            factory_image=v100,
            factory_version="1.0.0",
            health_command=SIM_HEALTH_COMMAND,
            enrollment_token=lambda serial, hw: operator.add_device(serial, hw).token,
            tpm_tctis=tctis,
            director_root=director_root,
        )
        console.print(f"{count} devices enrolled (client certificates from the device CA)")
        console.print(
            f"{len(tctis)} devices TPM-backed (swtpm: key made in the TPM, presented in TLS "
            f"through tpm2-openssl, floor in NV counters), {count - len(tctis)} with "
            "development file keys"
        )
        attacker = CompromisedServer(server.data_dir)
        director = CompromisedDirector(server.app.state.director, server.data_dir)
        old_timestamp = attacker.current_timestamp()

        step("5. Release 1.1.0 (security); the director instructs every device to install it")
        v110 = _security_fix(v100, seed="1.1.0")
        # Through the offline ceremony: staged without a key, signed by two people, published,
        # with a delta from 1.0.0 and a zstd blob (ADR 0018).
        rel110, signed_by = ceremony_release(
            repo, v110, version="1.1.0", hardware_id=HARDWARE_ID, security=True,
            passphrase=passphrase, request=work / "1.1.0.request.json",
            sbom=_sbom(work, "1.1.0"),
            transfer=TransferRequest(compress="zstd", delta_from=("1.0.0",)),
        )  # fmt: skip
        console.print(
            f"1.1.0 staged, signed by {' and '.join(signed_by)}"
            + (" (in SoftHSM2)" if HSM_KEY_NAME in signed_by else "")
            + f", published; SBOM sha256 {_sbom_digest(rel110)}"
        )
        wait_served(server, repo)
        moved: dict[str, int] = {}
        runs = _update_fleet(console, fleet, "rollout 1.1.0", moved)
        versions = fleet.versions()
        updated = sum(
            1
            for r in runs
            if r.result and r.result.outcome == "updated" and versions[r.name] == "1.1.0"
        )
        for r in runs:
            if r.error is not None or versions[r.name] != "1.1.0":
                console.print(f"[red]{r.name}[/red] (runs {versions[r.name]}): {_what(r)}")
        console.print(f"{updated}/{count} devices run 1.1.0")
        full = rel110.length * len(moved)
        console.print(
            f"bytes moved for 1.1.0 ({len(moved)} devices reporting their downloads): "
            f"{sum(moved.values()):,} by delta from 1.0.0 vs "
            f"{full:,} as full images ({100 * sum(moved.values()) / max(full, 1):.1f} %)"
        )
        sbom_ok = _sbom_reports(console, fleet, rel110)

        step("5b. Staged rollouts: 4 phases to completion, then an automatic halt")
        staged = staged_rollouts(
            console,
            work / "sensors",
            server=server,
            repo=repo,
            director_root=director_root,
            passphrase=passphrase,
        )

        step("5c. Fleet monitoring: a crash-looping release, a cloned credential, a tampered slot")
        monitored = monitoring_demo(
            console,
            work / "meters",
            server=server,
            repo=repo,
            director_root=director_root,
            passphrase=passphrase,
        )

        outcomes: list[AttackOutcome] = []
        # (e) needs the honest 1.1.0 still served for recovery: performed first, listed last.
        slot_attack = _corrupt_running_slots(console, fleet)
        step("6a. Attack: tampered image blob on the server (1.2.0, one bit flipped)")
        v120 = make_image(work / "firmware.img", size=IMAGE_SIZE, seed="1.2.0")
        # security: the director instructs it at once (a feature would wait for a rollout)
        rel120, _ = ceremony_release(
            repo, v120, version="1.2.0", hardware_id=HARDWARE_ID, security=True,
            passphrase=passphrase, request=work / "1.2.0.request.json",
            sbom=_sbom(work, "1.2.0"),
        )  # fmt: skip
        wait_served(server, repo)
        attacker.tamper_blob(rel120.path)
        outcomes.append(_attack(console, fleet, "(a) tampered image", VerificationError, "1.1.0"))

        step("6b. Attack: replay of an older signed timestamp, snapshot and targets")
        current = attacker.current_timestamp()
        attacker.serve_timestamp(old_timestamp)
        outcomes.append(
            _attack(console, fleet, "(b) metadata rollback", VerificationError, "1.1.0")
        )
        attacker.serve_timestamp(current)

        step("6c. Attack: signed metadata offering only an older release, the director naming it")
        repo.withdraw_release(rel120.path)
        repo.withdraw_release(rel110.path)
        wait_served(server, repo)
        director.instruct(
            name=rel100.path,
            length=rel100.length,
            sha256=rel100.sha256,
            version="1.0.0",
            security_counter=rel100.info.security_counter,
        )
        outcomes.append(_attack(console, fleet, "(c) downgrade to 1.0.0", DowngradeError, "1.1.0"))
        director.restore()

        step("6h. Attack: the director's online key instructs images the repository lacks")
        director_attack = _compromised_director(console, fleet, director, operator, listed=rel100)

        step("6d. Attack: release signed by only the Ed25519 half of the hybrid targets key")
        # The compromised server signs snapshot and timestamp with its own online key.
        attacker.inject_targets(
            signers=[steal_key(repo, "targets-ed25519", passphrase("targets-ed25519"))],
            target_path="firmware-6.6.6.img",
            payload=b"malicious firmware" * 1000,
            custom={
                "version": "6.6.6",
                "security_counter": 99,
                "hardware_ids": [HARDWARE_ID],
                "release_type": "security",
            },
        )
        outcomes.append(
            _attack(console, fleet, "(d) single-key signature", VerificationError, "1.1.0")
        )
        outcomes.append(slot_attack)

        step("6f. Attack: a client without a certificate, and a quarantined device's")
        outcomes.append(_unidentified_clients(console, server, fleet, operator))

        step("6g. Attack: a device's running slot and its recorded digest rewritten")
        file_keyed = [n for n in fleet.names if n not in tctis]
        outcomes.append(_tampered_boot(console, work, fleet, operator, file_keyed=file_keyed))
        outcomes.append(director_attack)
        if keep_serving:
            serve_until_interrupted(console, server)
    finally:
        if attacker is not None:
            attacker.close()
        if operator is not None:
            operator.close()
        server.stop()
        if tpms is not None:
            tpms.close()

    step("Summary")
    table = Table()
    for col in ("check", "result", "detail"):
        table.add_column(col)
    rollout_ok = updated == count

    def short(text: str) -> str:
        return text if len(text) <= 90 else text[:89] + "…"

    table.add_row(
        "rollout 1.0.0 → 1.1.0 (director)",
        "[green]pass[/green]" if rollout_ok else "[red]FAIL[/red]",
        f"{updated}/{count} devices updated",
    )
    table.add_row(
        "SBOM digest reported (1.1.0)",
        "[green]pass[/green]" if sbom_ok == count else "[red]FAIL[/red]",
        f"{sbom_ok}/{count} devices report the signed SBOM's sha256",
    )
    table.add_row(
        "staged rollout (4 phases, sensors)",
        "[green]pass[/green]" if staged.completed else "[red]FAIL[/red]",
        staged.completed_detail,
    )
    table.add_row(
        "rollout of an unhealthy image",
        "[green]halted[/green]" if staged.halted else "[red]FAIL[/red]",
        staged.halted_detail,
    )
    for row in summary_rows(monitored):
        table.add_row(*row)
    for o in outcomes:
        table.add_row(
            o.name,
            "[green]refused[/green]" if o.ok else "[red]FAIL[/red]",
            short(f"{o.refused}/{o.total} refused: {o.reason}"),
        )
    console.print(table)
    refused = sum(o.ok for o in outcomes)
    ok = (
        rollout_ok
        and sbom_ok == count
        and staged.completed
        and staged.halted
        and refused == len(outcomes) == ATTACKS
        and monitored.ok
    )
    # The PASS line is what scripts and tests read: unchanged; the SBOM check counts in it.
    console.print(f"{sbom_ok}/{count} devices report the signed SBOM digest of 1.1.0")
    console.print(
        f"[bold]{'PASS' if ok else 'FAIL'}[/bold]: {updated}/{count} devices updated, "
        f"staged rollout {'completed' if staged.completed else 'FAILED'}, unhealthy rollout "
        f"{'halted' if staged.halted else 'NOT HALTED'}, {refused}/{ATTACKS} attacks refused, "
        f"{monitored.pass_line}"
    )
    return ok
