"""Argument parsing and dispatch. Thin: every command calls the public library API."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import logging
import os
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from otaguard import __version__
from otaguard._logging import LOG_FORMATS, configure_logging
from otaguard.cli._output import add_json_option, emit_json
from otaguard.cli._transfer import add_transfer_options, describe_encodings, transfer_request
from otaguard.model.errors import InsecureModeWarning, KeyAccessError, OperatorError, OtaguardError
from otaguard.model.manifest import BOOT_PCR
from otaguard.model.unsafe import Unsafe

if TYPE_CHECKING:
    from otaguard.crypto.signers import KeySecrets
    from otaguard.server.client import DeviceCheckins, FleetClient

__all__ = ["main", "passphrase_env_var"]

# Per key OTAGUARD_KEY_PASSPHRASE_<KEY NAME> (e.g. ..._TARGETS_ED25519), then this one for
# scripts that use one passphrase everywhere, then an interactive prompt naming the key.
PASSPHRASE_ENV = "OTAGUARD_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
TOKEN_ENV = "OTAGUARD_OPERATOR_TOKEN"  # noqa: S105 - a variable name
SERVER_ENV = "OTAGUARD_SERVER"
CA_ENV = "OTAGUARD_CA"
ENROLL_TOKEN_ENV = "OTAGUARD_ENROLL_TOKEN"  # noqa: S105 - a variable name
TRUSTED_PROXIES_ENV = "OTAGUARD_TRUSTED_PROXIES"
MANUFACTURER_CA_ENV = "OTAGUARD_MANUFACTURER_CA"
# May carry a password: the environment keeps it out of argv (other users see ps).
DATABASE_URL_ENV = "OTAGUARD_DATABASE_URL"
# The user PIN of the token holding the server's hsm: online/director keys (never argv).
HSM_PIN_ENV = "OTAGUARD_HSM_PIN"
EXIT_ROLLED_BACK = 6
EXIT_RECOVERY = 7  # no slot may boot: the device waits for a release at or above its floor
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: run again later
# Operator tokens are 43 URL-safe characters; anything long is the wrong file.
MAX_TOKEN_CHARS = 512

# soft_wrap: one-line messages stay one line when piped (logs, CI, tests)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


# -- helpers -------------------------------------------------------------------------
def passphrase_env_var(key_name: str) -> str:
    """The environment variable holding one key's passphrase (``targets-ed25519`` ->
    ``OTAGUARD_KEY_PASSPHRASE_TARGETS_ED25519``)."""
    return f"{PASSPHRASE_ENV}_{re.sub(r'[^A-Za-z0-9]', '_', key_name).upper()}"


def _passphrases(*, new: bool) -> Callable[[str], bytes]:
    """A secrets source asking per key: its variable, the shared one, then a prompt."""

    def passphrase(name: str) -> bytes:
        own = passphrase_env_var(name)
        for var in (own, PASSPHRASE_ENV):
            value = os.environ.get(var)
            if value:
                return value.encode()
        if not sys.stdin.isatty():
            raise KeyAccessError(
                f"no passphrase for key {name}: set {own} (or {PASSPHRASE_ENV}) "
                "or run interactively"
            )
        first = getpass.getpass(f"{'New passphrase' if new else 'Passphrase'} for key {name}: ")
        if not first:
            raise KeyAccessError(f"empty passphrase for key {name}")
        if new and getpass.getpass(f"Repeat the passphrase for key {name}: ") != first:
            raise KeyAccessError(f"the passphrases for key {name} do not match")
        return first.encode()

    return passphrase


def _secrets(a: argparse.Namespace) -> KeySecrets:
    if a.insecure_plaintext_keys:
        return Unsafe.PLAINTEXT_KEYS
    return _passphrases(new=False)


def _duration(text: str) -> dt.timedelta:
    """argparse type: ``30s``, ``15m``, ``12h``, ``1d`` or a bare number of seconds."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use e.g. 30s, 12h or 7d (a bare number is seconds)"
        )
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return dt.timedelta(seconds=float(m.group(1)) * unit)
    except OverflowError as e:
        raise argparse.ArgumentTypeError(f"duration {text!r} is too long") from e


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    )


# -- repository and releases -------------------------------------------------------------
def _repo_init(a: argparse.Namespace) -> int:
    from otaguard.cli._keys import key_specs
    from otaguard.crypto.signers import read_public_key
    from otaguard.repo import ImageRepository

    expiries = {
        role: days
        for role in ("root", "targets", "snapshot", "timestamp")
        if (days := getattr(a, f"{role}_expiry_days")) is not None
    }
    online_key = read_public_key(a.online_key) if a.online_key is not None else None
    secrets: KeySecrets = (
        Unsafe.PLAINTEXT_KEYS if a.insecure_plaintext_keys else _passphrases(new=True)
    )
    repo = ImageRepository.init(
        a.repo_dir,
        keys_dir=a.keys_dir,
        passphrases=secrets,
        online_key=online_key,
        expiry_days=expiries,
        key_specs=key_specs(a),
    )
    out.print(f"initialised image repository in {repo.dir}")
    out.print(f"private keys (keep them offline): {repo.keys_dir}")
    if online_key is not None:
        out.print(
            f"snapshot and timestamp: signed by the update server (key {online_key.keyid[:16]}…)"
        )
    else:
        out.print("snapshot and timestamp: signed here; run 'otaguard repo refresh' daily")
    out.print(f"trusted root for devices: {repo.metadata_dir / 'root.json'}")
    return 0


def _director_init(a: argparse.Namespace) -> int:
    from otaguard.crypto.signers import read_public_key
    from otaguard.repo.director import DIRECTOR_ROOT_EXPIRY_DAYS, init_director

    online_key = read_public_key(a.online_key)
    secrets: KeySecrets = (
        Unsafe.PLAINTEXT_KEYS if a.insecure_plaintext_keys else _passphrases(new=True)
    )
    root = init_director(
        a.director_dir,
        keys_dir=a.keys_dir,
        passphrases=secrets,
        online_key=online_key,
        root_expiry_days=a.root_expiry_days or DIRECTOR_ROOT_EXPIRY_DAYS,
    )
    out.print(f"initialised the director root in {a.director_dir}", markup=False)
    out.print(f"private root keys (keep them offline): {a.keys_dir}", markup=False)
    out.print(
        f"per-device targets: signed by the update server (key {online_key.keyid[:16]}…)",
        markup=False,
    )
    out.print(f"director root for devices (device init --director-root): {root}", markup=False)
    return 0


def _repo_verify(a: argparse.Namespace) -> int:
    from otaguard.cli._render import render_verification
    from otaguard.model.errors import VerificationError
    from otaguard.repo import ImageRepository

    repo = ImageRepository(a.repo_dir)
    report, checks = repo.verify()
    render_verification(out, report, checks)
    problems = report.all_problems() + [f"target {c.path}: {c.problem}" for c in checks if not c.ok]
    if problems:
        # main() prints it as one line and exits with VerificationError's code (3).
        raise VerificationError(problems[0])
    out.print("[green]repository verified[/green]")
    return 0


def _repo_refresh(a: argparse.Namespace) -> int:
    from otaguard.repo import ImageRepository

    repo = ImageRepository(a.repo_dir, passphrases=_secrets(a), keys_dir=a.keys_dir)
    roles = a.role or ("snapshot", "timestamp")
    repo.refresh(roles=roles)
    out.print("re-signed " + ", ".join(roles))
    return 0


def _release_add(a: argparse.Namespace) -> int:
    from otaguard.repo import ImageRepository

    repo = ImageRepository(a.repo_dir, passphrases=_secrets(a), keys_dir=a.keys_dir)
    size = a.image.stat().st_size if a.image.is_file() else 0
    with _progress() as prog:
        task = prog.add_task("hashing image", total=size)
        rel = repo.add_release(
            a.image,
            version=a.version,
            hardware_ids=a.hardware_id,
            security=a.security,
            security_counter=a.security_counter,
            sbom=a.sbom,
            progress=lambda n: prog.advance(task, n),
            transfer=transfer_request(a),
        )
    out.print(
        f"added [bold]{rel.path}[/bold] version {rel.info.version} ({rel.info.release_type}, "
        f"security counter {rel.info.security_counter}) sha256 {rel.sha256}"
    )
    if rel.info.sbom is not None:
        out.print(f"SBOM {rel.info.sbom.path} sha256 {rel.info.sbom.sha256}")
    describe_encodings(repo.latest_targets(), rel.path, out.print)
    if repo.server_signed:
        out.print("the update server signs snapshot and timestamp when it takes this release")
    return 0


def _release_withdraw(a: argparse.Namespace) -> int:
    from otaguard.repo import ImageRepository

    repo = ImageRepository(a.repo_dir, passphrases=_secrets(a), keys_dir=a.keys_dir)
    repo.withdraw_release(a.target)
    out.print(f"withdrew {a.target}")
    return 0


def _release_list(a: argparse.Namespace) -> int:
    from otaguard.cli._render import release_rows, render_releases
    from otaguard.repo import ImageRepository

    releases = ImageRepository(a.repo_dir).releases()
    if a.json:
        emit_json(release_rows(releases))
    else:
        render_releases(out, releases)
    return 0


# -- server --------------------------------------------------------------------------
def _server(a: argparse.Namespace) -> int:
    from otaguard.cli._monitor import monitor_settings
    from otaguard.server import ServerSettings, run_server

    if not a.access_log:
        logging.getLogger("otaguard.access").setLevel(logging.WARNING)
    if a.data is None:
        raise OperatorError("the server needs its data directory: --data DIR")
    try:
        settings = ServerSettings(
            data_dir=a.data,
            repo_dir=a.repo,
            host=a.host,
            port=a.port,
            insecure_http=a.insecure_http,
            insecure_no_client_auth=a.insecure_no_client_auth,
            tls_cert=a.tls_cert,
            tls_key=a.tls_key,
            tls_names=tuple(a.tls_name or ()),
            # The flags replace the environment's list, they do not add to it.
            trusted_proxies=tuple(a.trusted_proxy or ()),
            manufacturer_ca=a.manufacturer_ca,
            director_dir=a.director,
            director_key_uri=a.director_key_uri,
            rollout_interval=a.rollout_interval,
            static_tree=a.static_tree,
            **({"header_timeout": a.header_timeout} if a.header_timeout is not None else {}),
            **_durations(a, "timestamp_expiry", "snapshot_expiry", "device_cert_lifetime"),  # type: ignore[arg-type]
            online_key_uri=a.online_key_uri,
            hsm_pin=os.environ.get(HSM_PIN_ENV) or None,
            database_url=a.database_url or None,
            **monitor_settings(a),
        )
    except ValueError as e:
        raise OperatorError(str(e)) from e
    run_server(settings)
    return 0


def _durations(a: argparse.Namespace, *names: str) -> dict[str, dt.timedelta]:
    """Durations from flags (timedelta) or a config file (seconds)."""
    return {
        n: v if isinstance(v, dt.timedelta) else dt.timedelta(seconds=float(v))
        for n in names
        if (v := getattr(a, n)) is not None
    }


def _database_url(a: argparse.Namespace) -> str:
    """The database ``server db`` works on: ``--database-url``/env, or the embedded one."""
    from otaguard.server.storage import sqlite_url
    from otaguard.server.storage.database import normalise_url

    if a.database_url:
        if a.data is not None:
            raise OperatorError("give --database-url or --data, not both")
        url = str(a.database_url)
        parsed = normalise_url(url)
        if (
            a.db_cmd == "status"
            and parsed.get_backend_name() == "sqlite"
            and not Path(str(parsed.database)).is_file()
        ):
            # Connecting would create an empty file and report it "behind".
            raise OperatorError(f"no database file {parsed.database}")
        return url
    if a.data is None:
        raise OperatorError(
            f"which database? pass --database-url URL (or set {DATABASE_URL_ENV}), or --data "
            "DIR for the embedded SQLite database"
        )
    if not (a.data / "otaguard.db").is_file():
        raise OperatorError(f"no server database in {a.data} (expected {a.data}/otaguard.db)")
    return sqlite_url(a.data / "otaguard.db")


def _server_db(a: argparse.Namespace) -> int:
    from otaguard.server.storage import head_revision, mask_url, upgrade_database
    from otaguard.server.storage.migrate import current_revision

    url = _database_url(a)
    if a.db_cmd == "upgrade":
        before, after = upgrade_database(url)
        if before == after:
            out.print(f"{mask_url(url)}: already at schema revision {after}", markup=False)
        else:
            out.print(
                f"{mask_url(url)}: upgraded from schema revision {before or 'none'} to {after}",
                markup=False,
            )
        return 0
    current, head = current_revision(url), head_revision()
    state = "current" if current == head else "behind: run 'otaguard server db upgrade'"
    out.print(
        f"{mask_url(url)}: schema revision {current or 'none'}, this otaguard needs {head} "
        f"({state})",
        markup=False,
    )
    return 0 if current == head else 1


# -- manufacturer ----------------------------------------------------------------------
def _manufacturer(a: argparse.Namespace) -> int:
    from otaguard.crypto.manufacturer import ManufacturerCA

    if a.manufacturer_cmd == "init":
        ca = ManufacturerCA.create(a.dir, name=a.name)
        out.print(
            f"created manufacturer CA {ca.cert_path} (for 'otaguard server --manufacturer-ca')",
            markup=False,
        )
        return 0
    ca = ManufacturerCA.load(a.dir)
    cert_path, key_path = Path(f"{a.out}.pem"), Path(f"{a.out}.key")
    try:
        cert = ca.issue_to_files(
            serial=a.serial, hardware_id=a.hardware_id, cert_path=cert_path, key_path=key_path,
            lifetime=a.lifetime,
        )  # fmt: skip
    except ValueError as e:
        raise OperatorError(str(e)) from e
    out.print(
        f"factory certificate for {a.serial}: {cert_path} (key {key_path}, mode 0600), "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        markup=False,
    )
    return 0


def _server_init(a: argparse.Namespace) -> int:
    from otaguard.server import init_data_dir

    paths = init_data_dir(
        a.data,
        online_key_uri=a.online_key_uri,
        director_key_uri=a.director_key_uri,
        hsm_pin=os.environ.get(HSM_PIN_ENV) or None,
    )
    out.print(f"prepared server data directory {paths.data_dir}")
    out.print(
        f"online public key (for 'otaguard repo init --online-key'): {paths.online_public_key}"
    )
    out.print(
        "director public key (for 'otaguard director init --online-key'): "
        f"{paths.director_public_key}"
    )
    out.print(f"CA certificate (for devices and 'otaguard publish --ca'): {paths.ca_cert}")
    out.print(f"operator token file: {paths.operator_token}")
    return 0


def _operator_token(a: argparse.Namespace) -> str:
    """The operator token from ``--token-file`` or the environment, never from argv."""
    # A secret is never taken from the command line (other users see argv in ps).
    token: str | None
    if a.token_file is not None:
        try:
            token = a.token_file.read_text().strip()
        except OSError as e:
            raise OperatorError(f"cannot read token file {a.token_file}: {e.strerror}") from e
    else:
        token = os.environ.get(TOKEN_ENV)
    if not token:
        raise OperatorError(f"no operator token: pass --token-file or set {TOKEN_ENV}")
    if len(token) > MAX_TOKEN_CHARS or not all(
        c.isascii() and c.isprintable() and c != " " for c in token
    ):
        raise OperatorError(
            "the operator token is malformed (expected one line, as in DATA/operator-token)"
        )
    return token


def _publish(a: argparse.Namespace) -> int:
    from otaguard.server.client import publish_repository

    token = _operator_token(a)
    result = publish_repository(a.repo_dir, server_url=a.server, ca_cert=a.ca, token=token)
    out.print(
        f"published to {a.server}: {len(result.uploaded)} blob(s) uploaded, "
        f"{len(result.already_present)} already there; {len(result.added)} metadata file(s) added"
        + (f"; now serving {result.timestamp}" if result.timestamp else "; nothing new to serve")
    )
    return 0


# -- fleet ---------------------------------------------------------------------------
def _fleet_client(a: argparse.Namespace) -> FleetClient:
    from otaguard.server.client import FleetClient

    if not a.server:
        raise OperatorError(f"no server: pass --server URL or set {SERVER_ENV}")
    if a.ca is None and a.server.startswith("https://"):
        raise OperatorError(f"no server CA certificate: pass --ca FILE or set {CA_ENV}")
    return FleetClient(server_url=a.server, ca_cert=a.ca, token=_operator_token(a))


def _when(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fleet(a: argparse.Namespace) -> int:

    with _fleet_client(a) as client:
        if a.fleet_cmd == "add-device":
            new = client.add_device(a.serial, a.hardware_id)
            out.print(
                f"registered device {new.device.serial} (hardware id {new.device.hardware_id})",
                markup=False,
            )
            out.print(
                "enrollment token (single use; give it to the device, store it nowhere):",
                markup=False,
            )
            # The token and its expiry, alone on the last line, for scripts (tail -n1).
            out.print(f"{new.token} expires {_when(new.token_expires)}", markup=False)
            return 0
        if a.fleet_cmd == "token":
            new = client.new_token(a.serial)
            out.print(f"new enrollment token for {a.serial} (single use):", markup=False)
            out.print(f"{new.token} expires {_when(new.token_expires)}", markup=False)
            return 0
        if a.fleet_cmd == "assign":
            mode, version = client.assign(a.serial, version=a.release, hold=a.hold)
            what = {
                "release": f"release {version}",
                "hold": "nothing (hold)",
                "default": "security releases and rollouts (channels, the default)",
            }.get(mode, mode)
            out.print(f"director: {a.serial} is told to install {what}", markup=False)
            return 0
        if a.fleet_cmd == "quarantine":
            d = client.quarantine(a.serial, a.reason)
        elif a.fleet_cmd == "release":
            d = client.release(a.serial)
        else:
            d = client.revoke(a.serial, a.reason)
    out.print(
        f"device {d.serial}: {d.status}" + (f" ({d.reason})" if d.reason else ""), markup=False
    )
    out.print(f"hardware id: {d.hardware_id}", markup=False)
    out.print(f"registered: {_when(d.created_at)}; changed: {_when(d.updated_at)}", markup=False)
    out.print(
        "certificates issued: " + (", ".join(d.cert_serials) if d.cert_serials else "none"),
        markup=False,
    )
    return 0


def _show_checkins(c: DeviceCheckins) -> None:
    """The last check-in and the alerts of ``fleet show``."""
    out.print(
        "attestation key: "
        + (
            "registered (every check-in needs a TPM quote)"
            if c.attestation_key
            else "none (measurements unattested)"
        ),
        markup=False,
    )
    if not c.checkins:
        out.print("last check-in: never", markup=False)
    else:
        last = c.checkins[0]
        out.print(
            f"last check-in: {_when(last.time)} {last.outcome}, running {last.running_version}"
            + (f" ({last.target})" if last.target else "")
            + f", boot sha256 {last.boot_sha256[:16]}… "
            + ("attested by TPM quote" if last.attested else "unattested"),
            markup=False,
        )
        if last.detail:
            out.print(f"  {last.detail}", markup=False)
    for when, kind, detail in c.alerts:
        out.print(f"ALERT {_when(when)} {kind}: {detail}", markup=False)


# -- device --------------------------------------------------------------------------
def _device_init(a: argparse.Namespace) -> int:
    from otaguard.agent import Device

    dev = Device.provision(
        a.device_dir,
        server_url=a.server,
        root_json=a.root,
        ca_pem=a.ca,
        hardware_id=a.hardware_id,
        serial=a.serial,
        factory_image=a.factory_image,
        factory_version=a.factory_version,
        factory_security_counter=a.factory_security_counter,
        insecure_http=a.insecure_http,
        tpm_tcti=a.tpm,
        unsafe_file_device_key=a.unsafe_file_key,
        director_root=a.director_root,
        health_command=_health_argv(a),
    )
    out.print(f"provisioned device in {dev.paths.root} running {a.factory_version} from slot A")
    return 0


def _health_argv(a: argparse.Namespace) -> list[str] | Literal[Unsafe.NO_HEALTH_CHECK]:
    """The health command as an argv list: split, or a shell only when asked for."""
    if a.unsafe_no_health_check:
        return Unsafe.NO_HEALTH_CHECK
    if a.health_shell is not None:
        return ["/bin/sh", "-c", a.health_shell]
    try:
        argv = shlex.split(a.health_command)
    except ValueError as e:
        raise OperatorError(f"--health-command cannot be split into arguments: {e}") from e
    if not argv:
        raise OperatorError("--health-command is empty")
    return argv


def _device_enroll(a: argparse.Namespace) -> int:
    from otaguard.agent import Device

    if (a.factory_cert is None) is not (a.factory_key is None):
        raise OperatorError("give both --factory-cert and --factory-key, or neither")
    if a.factory_cert is not None:
        if a.token is not None or a.token_file is not None:
            raise OperatorError("enroll with a token or a factory certificate, not both")
        dev = Device(a.device_dir)
        cert = dev.enroll_with_factory_certificate(
            factory_cert=a.factory_cert, factory_key=a.factory_key,
            key_store=dev.key_store,
        )  # fmt: skip
        out.print(
            f"enrolled device {dev.config.serial} with its factory certificate: certificate "
            f"{cert.serial_number:x} valid until {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            markup=False,
        )
        return 0
    # Single use and short-lived, so argv is accepted; the environment is preferred.
    token: str | None = a.token
    if token is not None and a.token_file is not None:
        raise OperatorError("give the enrollment token once: --token or --token-file")
    if token is None and a.token_file is not None:
        try:
            token = a.token_file.read_text().strip()
        except OSError as e:
            raise OperatorError(f"cannot read token file {a.token_file}: {e.strerror}") from e
    elif token is None:
        token = os.environ.get(ENROLL_TOKEN_ENV)
    if not token:
        raise OperatorError(f"no enrollment token: pass --token or set {ENROLL_TOKEN_ENV}")
    dev = Device(a.device_dir)
    cert = dev.enroll(token, key_store=dev.key_store)
    out.print(
        f"enrolled device {dev.config.serial}: certificate {cert.serial_number:x} valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        markup=False,
    )
    return 0


def _agent(a: argparse.Namespace) -> int:  # noqa: PLR0911 - one return per action
    from otaguard.agent import Device
    from otaguard.cli._render import render_selection

    dev = Device(a.device_dir, config_overrides=_device_integration(a))
    _agent_overrides(dev, a)
    if a.action == "mark-good":
        return _mark_good(dev)
    if a.action == "clear-rejected":
        return _clear_rejected(dev)
    if a.action == "measure-boot":
        return _measure_boot(dev, json_out=a.json)
    if a.action == "status":
        return _agent_status(dev, json_out=a.json)
    if a.action == "boot":
        rec = dev.boot()
        if rec.recovery:
            err.print(f"recovery: {rec.note}", markup=False)
            err.print("run 'otaguard agent DEVICE_DIR update' to install a release", markup=False)
            return EXIT_RECOVERY
        kind = "trial boot of" if rec.trial else "booted"
        out.print(
            f"{kind} slot {rec.slot} (version {rec.version}, digest verified, "
            "not below the anti-rollback floor)"
        )
        out.print(
            f"measured sha256 {rec.sha256[:16]}… "
            + (
                f"into TPM PCR {BOOT_PCR} and the event log"
                if dev.config.tpm
                else "into the event log (unattested: no TPM)"
            ),
            markup=False,
        )
        if rec.note:
            err.print(f"[yellow]{rec.note}[/yellow]")
        return 0
    if a.action == "check":
        running, sel = dev.check()
        render_selection(out, running, sel)
        return 0
    if a.action == "update":
        with _progress() as prog:
            tasks: dict[str, Any] = {}

            def on_progress(stage: str, n: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = prog.add_task(stage, total=total)
                prog.advance(tasks[stage], n)

            res = dev.update(progress=on_progress)
        return _render_update(res)
    # run: SIGTERM and Ctrl-C cancel whatever the agent waits on (a download, a slot
    # write, a health check, the poll interval); an install in progress resumes later.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: dev.request_stop())
    out.print(
        f"polling every {dev.config.poll_interval_s:g} s "
        f"(±{dev.config.poll_jitter:.0%})"
        + (
            f"; MQTT {dev.config.mqtt_url}: telemetry, check-in hints (at most one early "
            f"check-in per {dev.config.hint_min_interval_s:g} s)"
            if dev.config.mqtt_url
            else ""
        )
        + "; Ctrl-C or SIGTERM stops"
    )
    dev.run(
        on_result=lambda r: out.print(
            f"{r.outcome}: {r.from_version} {r.to_version or ''} {r.detail}"
        ),
        on_error=lambda e: err.print(e.diagnostics()),
    )
    out.print("stopped")
    return 0


def _device_integration(a: argparse.Namespace) -> dict[str, Any]:
    """agent.toml's device integration (bootloader, slot devices, health by units) over
    config.json's: the backends are built from them, so they go in before the device opens.
    ``health_by_units = true`` replaces config.json's health command."""
    out: dict[str, Any] = {}
    for name in ("bootloader", "slot_devices", "health_by_units"):
        value = getattr(a, name, None)
        if value is not None:
            out[name] = value
    if out.get("health_by_units") is True:
        out["health_command"] = None
    return out


def _agent_overrides(dev: Any, a: argparse.Namespace) -> None:
    """The operating settings of agent.toml, the environment and flags over config.json."""
    import dataclasses

    changes: dict[str, Any] = {}
    if a.interval is not None:
        changes["poll_interval_s"] = float(a.interval)
    if a.jitter is not None:
        changes["poll_jitter"] = float(a.jitter)
    for name in ("download_min_rate_bps", "download_deadline_base_s", "mqtt_url"):
        if getattr(a, name, None) is not None:
            changes[name] = getattr(a, name)
    if getattr(a, "mqtt_ca", None) is not None:
        changes["mqtt_ca"] = str(a.mqtt_ca)
    if getattr(a, "hint_min_interval", None) is not None:
        changes["hint_min_interval_s"] = float(a.hint_min_interval)
    if changes:
        dev.config = dataclasses.replace(dev.config, **changes)


def _agent_status(dev: Any, *, json_out: bool) -> int:
    """``agent status``: a table and lines, or one JSON document with ``--json``."""
    from otaguard.cli._render import render_status, status_document

    if json_out:
        emit_json(status_document(dev.status()))
    else:
        render_status(out, dev.status())
    return 0


def _render_update(res: Any) -> int:
    """Print an ``agent update`` outcome; its exit code."""
    if res.outcome == "up-to-date":
        out.print(f"up to date: running {res.from_version}")
    elif res.outcome in ("updated", "recovered"):
        out.print(
            f"[green]{res.outcome}[/green] {res.from_version} → {res.to_version}: {res.detail}"
        )
    elif res.outcome in ("awaiting-mark-good", "rebooting"):
        out.print(f"{res.outcome} ({res.to_version or ''}): {res.detail}", markup=False)
    elif res.outcome == "recovery-pending":
        err.print("recovery: no release at or above the anti-rollback floor is offered yet")
        return EXIT_RECOVERY
    else:
        err.print(f"[red]{res.outcome}[/red] ({res.to_version}): {res.detail}")
        return EXIT_ROLLED_BACK
    for path, why in res.refused:
        err.print(f"[yellow]refused[/yellow] {path}: {why}")
    return 0


def _clear_rejected(dev: Any) -> int:
    """``agent clear-rejected``: forget the images rolled back on this device."""
    cleared = dev.clear_rejected()
    for sha in cleared:
        out.print(f"forgot rolled-back image sha256 {sha}", markup=False)
    out.print(f"{len(cleared)} rolled-back image(s) may be selected again", markup=False)
    return 0


def _measure_boot(dev: Any, *, json_out: bool) -> int:
    """``agent measure-boot``: measure the booted slot once per boot (unattested).

    Exit 1 when the slot does not hold what was written to it: the measurement is logged
    all the same (the server quarantines the device at its next check-in).
    """
    m = dev.measure_boot()
    if json_out:
        emit_json(
            {
                "boot_id": m.boot_id,
                "slot": m.slot,
                "sha256": m.sha256,
                "recorded_sha256": m.recorded,
                "matches": m.matches,
                "fresh": m.fresh,
                "attested": False,
            }
        )
    elif m.fresh:
        out.print(f"measured slot {m.slot} (unattested): sha256 {m.sha256}", markup=False)
    else:
        out.print(f"boot {m.boot_id} already measured: slot {m.slot} {m.sha256}", markup=False)
    # A fresh mismatch was logged as a warning when measured; exit 1 says it again.
    if not m.matches and not m.fresh:
        err.print(f"slot {m.slot} does not hold what was written to it", markup=False)
    return 0 if m.matches else 1


def _mark_good(dev: Any) -> int:
    """``agent mark-good``: confirm the running slot, committing a waiting install."""
    res = dev.mark_good()
    if res.outcome == "rolled-back":
        err.print(
            f"[red]rolled back[/red]: running {res.version} from slot {res.slot}; the failed "
            f"slot is marked bad ({res.detail})"
        )
        return EXIT_ROLLED_BACK
    if res.outcome == "pending":
        err.print(f"install not finished (phase {res.detail}); run again", markup=False)
        return EXIT_TEMPFAIL
    what = "committed" if res.outcome == "updated" else "confirmed"
    out.print(f"{what}: slot {res.slot} running {res.version} marked good", markup=False)
    return 0


def _demo(a: argparse.Namespace) -> int:
    from otaguard.sim.demo import run_demo

    ok = run_demo(devices=a.devices, workdir=a.workdir, console=out, keep_serving=a.keep_serving)
    return 0 if ok else 1


# -- parser --------------------------------------------------------------------------
class _RefuseSecret(argparse.Action):
    """Refuse a secret given as an argument; the error does not repeat the value."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            f"{option_string} is not accepted: a token on the command line is visible to "
            f"other users; use --token-file FILE or ${TOKEN_ENV}"
        )


def _plaintext_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--insecure-plaintext-keys", action="store_true", help=f"development only: {what}"
    )


def _key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keys-dir",
        type=Path,
        metavar="KEYS_DIR",
        help="where the private keys are, if not where 'repo init' put them",
    )
    _plaintext_option(p, "the repository's keys are unencrypted")


def _server_key_uris(p: argparse.ArgumentParser) -> None:
    for role, what in (("online", "snapshot/timestamp"), ("director", "director")):
        p.add_argument(
            f"--{role}-key-uri",
            metavar="URI",
            help=f"signer URI of the {what} key, e.g. hsm:ID?label=TOKEN (PIN in "
            f"${HSM_PIN_ENV}; public key in DATA/{role}-key.pub.json, written from the "
            "token the first time); default: the file key in DATA (warns)",
        )


def _seconds(text: str) -> float:
    """argparse type: a duration in seconds (``300``, ``5m``)."""
    seconds = _duration(text).total_seconds()
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return seconds


def _config_option(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"settings file (TOML; default /etc/otaguard/{name} if it exists; "
        "docs/configuration.md); OTAGUARD_<KEY> overrides it, flags override both",
    )


def _apply_config(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Fill ``args`` from the command's config file and environment (flags win)."""
    from otaguard.cli._config import (
        AGENT_CONFIG,
        AGENT_KEYS,
        SERVER_CONFIG,
        SERVER_KEYS,
        apply_config,
        load_config,
    )

    kind = getattr(args, "config_keys", None)
    if kind is None or getattr(args, "server_cmd", None):
        return
    keys, default = (AGENT_KEYS, AGENT_CONFIG) if kind == "agent" else (SERVER_KEYS, SERVER_CONFIG)
    values = load_config(args.config, default=default, keys=keys, environ=os.environ)
    apply_config(args, values, keys=keys, argv=argv)
    if kind == "agent" and args.device_dir is None:
        raise OperatorError(
            "which device? give DEVICE_DIR, or device_dir in the config file "
            f"({args.config or default})"
        )


def _parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - declarative
    from otaguard.cli._keys import (
        add_ceremony_parsers,
        add_key_parsers,
        add_kofn_options,
        add_root_ceremony_parser,
    )
    from otaguard.cli._monitor import (
        add_alerts_parser,
        add_monitor_server_options,
        add_mqtt_files_parser,
    )
    from otaguard.cli._ops import (
        add_ops_parsers,
        add_server_operator_parser,
        fleet_inventory_parsers,
    )
    from otaguard.cli._rollouts import add_rollout_parsers, release_check_parser
    from otaguard.cli._rotate import add_director_rotate_parser, add_repo_rotate_parser
    from otaguard.cli._sbom import add_sbom_parsers
    from otaguard.cli._sim import add_sim_parser
    from otaguard.cli._vuln import add_vuln_parsers

    p = argparse.ArgumentParser(prog="otaguard", description="Secure over-the-air updates.")
    p.add_argument("--version", action="version", version=f"otaguard {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as text (default) or JSON, one object per line (also "
        "$OTAGUARD_LOG_FORMAT or log_format in the agent's and server's config file)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    repo = sub.add_parser("repo", help="image repository").add_subparsers(
        dest="repo_cmd", required=True
    )
    init = repo.add_parser("init", help="create offline keys and initial signed metadata")
    init.add_argument("repo_dir", type=Path)
    init.add_argument(
        "--keys-dir",
        type=Path,
        required=True,
        metavar="KEYS_DIR",
        help="new directory for the private keys, outside REPO_DIR (keep it offline)",
    )
    init.add_argument(
        "--online-key",
        type=Path,
        metavar="PUB_JSON",
        help="the update server's online public key (DATA/online-key.pub.json): the server "
        "signs snapshot and timestamp; without it they are signed here (server-less mode)",
    )
    _plaintext_option(init, "store private keys unencrypted")
    for role, days in (("root", 365), ("targets", 90), ("snapshot", 7), ("timestamp", 1)):
        init.add_argument(
            f"--{role}-expiry-days",
            type=int,
            metavar="DAYS",
            help=f"{role} metadata lifetime (default {days})"
            + (", server-less mode only" if role in ("snapshot", "timestamp") else ""),
        )
    add_kofn_options(init)
    init.set_defaults(func=_repo_init)
    ver = repo.add_parser("verify", help="check signatures, thresholds, expiry and target hashes")
    ver.add_argument("repo_dir", type=Path)
    ver.set_defaults(func=_repo_verify)
    ref = repo.add_parser(
        "refresh", help="server-less mode: re-sign snapshot and timestamp before they expire"
    )
    ref.add_argument("repo_dir", type=Path)
    ref.add_argument("--role", action="append", choices=("targets", "snapshot", "timestamp"))
    _key_options(ref)
    ref.set_defaults(func=_repo_refresh)
    add_root_ceremony_parser(repo)
    add_repo_rotate_parser(repo)

    dirp = sub.add_parser("director", help="director repository (Uptane)").add_subparsers(
        dest="director_cmd", required=True
    )
    dinit_ = dirp.add_parser(
        "init", help="create the director's offline root keys and its signed root"
    )
    dinit_.add_argument("director_dir", type=Path)
    dinit_.add_argument(
        "--keys-dir",
        type=Path,
        required=True,
        metavar="KEYS_DIR",
        help="new directory for the root keys, outside DIRECTOR_DIR (keep it offline)",
    )
    dinit_.add_argument(
        "--online-key",
        type=Path,
        required=True,
        metavar="PUB_JSON",
        help="the update server's director public key (DATA/director-key.pub.json)",
    )
    dinit_.add_argument(
        "--root-expiry-days", type=int, metavar="DAYS", help="root lifetime (default 365)"
    )
    _plaintext_option(dinit_, "store private keys unencrypted")
    dinit_.set_defaults(func=_director_init)
    add_director_rotate_parser(dirp)

    rel = sub.add_parser("release", help="releases").add_subparsers(
        dest="release_cmd", required=True
    )
    add = rel.add_parser("add", help="add a firmware image and re-sign")
    add.add_argument("repo_dir", type=Path)
    add.add_argument("image", type=Path)
    add.add_argument(
        "--version",
        required=True,
        help="semantic version X.Y.Z, above every published one for the hardware ids; "
        "below only for a --security fix on an older line (2.3.1 while 2.4.0 exists)",
    )
    add.add_argument("--hardware-id", action="append", required=True, metavar="HW")
    add.add_argument("--security", action="store_true", help="security release (else feature)")
    add.add_argument(
        "--security-counter",
        type=int,
        metavar="N",
        help="default: highest published, +1 for --security",
    )
    add.add_argument(
        "--sbom", type=Path, required=True, metavar="FILE", help="CycloneDX 1.5/1.6 JSON SBOM"
    )
    add_transfer_options(add)
    _key_options(add)
    add.set_defaults(func=_release_add)
    wd = rel.add_parser("withdraw", help="remove a release from the repository and re-sign")
    wd.add_argument("repo_dir", type=Path)
    wd.add_argument("target", help="target name, as shown by 'release list'")
    _key_options(wd)
    wd.set_defaults(func=_release_withdraw)
    lst = rel.add_parser("list", help="list published releases")
    lst.add_argument("repo_dir", type=Path)
    add_json_option(lst)
    lst.set_defaults(func=_release_list)
    release_check_parser(rel)
    add_ceremony_parsers(rel)
    add_key_parsers(sub)
    add_sbom_parsers(sub)
    add_vuln_parsers(sub)

    srv = sub.add_parser(
        "server", help="run the update server (HTTPS); 'server init' prepares its data directory"
    )
    srv.add_argument("--data", type=Path, help="server data directory (required)")
    srv.add_argument(
        "--repo", type=Path, help="image repository to serve and follow (no private keys in it)"
    )
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8443)
    srv.add_argument("--insecure-http", action="store_true", help="development only: plain HTTP")
    srv.add_argument(
        "--tls-cert", type=Path, help="your own server certificate (PEM chain); default: fleet CA's"
    )
    srv.add_argument("--tls-key", type=Path, help="the private key of --tls-cert")
    srv.add_argument(
        "--tls-name",
        action="append",
        metavar="NAME",
        help="extra host name or address in the CA-issued certificate (repeatable)",
    )
    srv.add_argument(
        "--insecure-no-client-auth",
        action="store_true",
        help="development only: serve metadata and targets to clients without a device "
        "certificate (warns on every start)",
    )
    srv.add_argument(
        "--timestamp-expiry",
        type=_duration,
        metavar="DURATION",
        help="lifetime of the timestamps the server signs, e.g. 1d, 12h, 300 (seconds); "
        "re-signed at half-life (default 1d)",
    )
    srv.add_argument(
        "--snapshot-expiry",
        type=_duration,
        metavar="DURATION",
        help="lifetime of the snapshots the server signs (default 7d)",
    )
    srv.add_argument(
        "--device-cert-lifetime",
        type=_duration,
        metavar="DURATION",
        help="lifetime of the device certificates the server issues (default 24h); "
        "devices renew when a third is left",
    )
    srv.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDR_OR_CIDR",
        help="reverse proxy (nginx) that terminates mutual TLS and forwards the verified "
        "client certificate (X-Client-Cert); repeatable (or $"
        f"{TRUSTED_PROXIES_ENV}, comma-separated). The header is ignored from anyone else",
    )
    env_mca = os.environ.get(MANUFACTURER_CA_ENV)
    srv.add_argument(
        "--manufacturer-ca",
        type=Path,
        default=Path(env_mca) if env_mca else None,
        metavar="PEM",
        help="manufacturer CA(s) whose factory certificates may enroll registered devices "
        f"in place of a token (or ${MANUFACTURER_CA_ENV})",
    )
    srv.add_argument(
        "--director",
        type=Path,
        metavar="DIRECTOR_DIR",
        help="director directory (otaguard director init; public, no private key): answer "
        "each check-in with the device's instruction signed by DATA/director-key.pem",
    )
    _server_key_uris(srv)
    srv.add_argument(
        "--rollout-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between evaluations of active rollouts (phase advance, automatic "
        "halt) besides those at check-ins; default 5",
    )
    srv.add_argument(
        "--static-tree",
        type=Path,
        metavar="DIR",
        help="keep the published repository as a static tree in DIR (metadata/, targets/) "
        "for nginx or a CDN to serve (deploy/nginx/otaguard-static.conf)",
    )
    srv.add_argument(
        "--header-timeout",
        type=float,
        metavar="SECONDS",
        help="close a connection whose request headers are not complete this long after "
        "the handshake or the previous response (slow clients); default 10",
    )
    env_db = os.environ.get(DATABASE_URL_ENV)
    db_help = (
        "database shared by several server processes, e.g. postgresql://otaguard@db:5432/"
        f"otaguard (or ${DATABASE_URL_ENV}: preferred, a password on the command line is "
        "visible to other local users); default: the embedded SQLite DATA/otaguard.db"
    )
    srv.add_argument("--database-url", default=env_db, metavar="URL", help=db_help)
    srv.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="do not log each request (method, path, status, time, client identity)",
    )
    add_monitor_server_options(srv)
    _config_option(srv, "server.toml")
    srv.set_defaults(func=_server, config_keys="server", log_level=logging.INFO)
    srv_cmds = srv.add_subparsers(dest="server_cmd", metavar="{init,operator,db,mqtt-files}")
    sinit = srv_cmds.add_parser(
        "init", help="prepare the data directory (online key, CA, operator token), print paths"
    )
    sinit.add_argument("--data", type=Path, required=True, help="server data directory")
    _server_key_uris(sinit)
    sinit.set_defaults(func=_server_init)
    add_server_operator_parser(srv_cmds)
    sdb = srv_cmds.add_parser(
        "db", help="the server's database schema: 'upgrade' migrates it, 'status' shows it"
    )
    sdb.add_argument("db_cmd", choices=("upgrade", "status"))
    # SUPPRESS: given before 'db' ('server --data D db upgrade') or after it, both count;
    # the parent's defaults (the environment's URL) apply when neither gives one.
    sdb.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL", help=db_help)
    sdb.add_argument(
        "--data",
        type=Path,
        default=argparse.SUPPRESS,
        help="the server data directory (embedded SQLite)",
    )
    sdb.set_defaults(func=_server_db)
    add_mqtt_files_parser(srv_cmds)

    # allow_abbrev=False: "--token X" must not be taken as an abbreviation of --token-file.
    pub = sub.add_parser(
        "publish", help="upload signed metadata and blobs to a server", allow_abbrev=False
    )
    pub.add_argument("repo_dir", type=Path)
    pub.add_argument("--server", required=True, metavar="URL")
    pub.add_argument("--ca", type=Path, required=True, help="CA certificate of the server")
    pub.add_argument("--token-file", type=Path, help=f"operator token file (or ${TOKEN_ENV})")
    # Not an option: refuses a token on the command line without echoing it back.
    pub.add_argument("--token", nargs="?", action=_RefuseSecret, help=argparse.SUPPRESS)
    pub.set_defaults(func=_publish)

    fleet = sub.add_parser(
        "fleet", help="device registry on the server (operator token)"
    ).add_subparsers(dest="fleet_cmd", required=True)

    def fleet_cmd(name: str, help_text: str, *, serial: bool = True) -> argparse.ArgumentParser:
        fp = fleet.add_parser(name, help=help_text, allow_abbrev=False)
        if serial:
            fp.add_argument("serial", metavar="SERIAL")
        fp.add_argument(
            "--server",
            default=os.environ.get(SERVER_ENV),
            metavar="URL",
            help=f"update server (or ${SERVER_ENV})",
        )
        env_ca = os.environ.get(CA_ENV)
        fp.add_argument(
            "--ca",
            type=Path,
            default=Path(env_ca) if env_ca else None,
            help=f"CA certificate of the server (or ${CA_ENV})",
        )
        fp.add_argument("--token-file", type=Path, help=f"operator token file (or ${TOKEN_ENV})")
        fp.add_argument("--token", nargs="?", action=_RefuseSecret, help=argparse.SUPPRESS)
        fp.set_defaults(func=_fleet)
        return fp

    fadd = fleet_cmd("add-device", "register a device; prints its single-use token", serial=False)
    fadd.add_argument("--serial", required=True)
    fadd.add_argument("--hardware-id", required=True, metavar="HW")
    fleet_inventory_parsers(fleet)
    fleet_cmd("quarantine", "refuse a device until released").add_argument(
        "--reason", required=True
    )
    fleet_cmd("release", "end a quarantine")
    fleet_cmd("revoke", "refuse a device for good").add_argument(
        "--reason", default="revoked by the operator"
    )
    fleet_cmd("token", "a new single-use enrollment token (re-enrollment)")
    fas = fleet_cmd(
        "assign", "what the director tells a device to install (server with --director)"
    ).add_mutually_exclusive_group(required=True)
    fas.add_argument("--release", metavar="VERSION", help="install this release")
    fas.add_argument("--hold", action="store_true", help="install nothing until changed")
    fas.add_argument(
        "--default",
        action="store_true",
        help="back to the default: security releases and rollouts (channels)",
    )
    add_ops_parsers(sub)
    add_rollout_parsers(sub)
    add_alerts_parser(sub)
    add_sim_parser(sub)

    dev = sub.add_parser("device", help="device provisioning").add_subparsers(
        dest="device_cmd", required=True
    )
    dinit = dev.add_parser("init", help="provision a simulated device directory")
    dinit.add_argument("device_dir", type=Path)
    dinit.add_argument("--server", required=True, metavar="URL")
    dinit.add_argument("--root", type=Path, required=True, help="image repository root.json")
    dinit.add_argument(
        "--director-root",
        type=Path,
        metavar="ROOT_JSON",
        help="the director's root.json (otaguard director init): install only what the "
        "director instructs and the image repository backs (Uptane); without it the "
        "device picks the newest release itself (warns)",
    )
    dinit.add_argument("--ca", type=Path, required=True, help="server CA certificate (PEM)")
    dinit.add_argument("--hardware-id", required=True)
    dinit.add_argument(
        "--serial",
        required=True,
        help="the device's serial: its identity towards the server (as in fleet add-device)",
    )
    dinit.add_argument("--factory-image", type=Path, required=True)
    dinit.add_argument("--factory-version", required=True)
    dinit.add_argument("--factory-security-counter", type=int, default=0)
    health = dinit.add_mutually_exclusive_group(required=True)
    health.add_argument(
        "--health-command",
        metavar="ARGV",
        help="command run after a new slot boots (exit 0 = healthy, else roll back), split "
        "into an argv list as a shell would split it but run without a shell (no pipes, "
        "redirections or $VARIABLES); stored as a list in config.json",
    )
    health.add_argument(
        "--health-shell",
        metavar="SCRIPT",
        help="a shell script run with /bin/sh -c instead (only when a shell is wanted)",
    )
    health.add_argument(
        "--unsafe-no-health-check",
        action="store_true",
        help="development only: commit a new image as soon as it boots (warns)",
    )
    dinit.add_argument("--insecure-http", action="store_true", help="development only")
    dinit.add_argument(
        "--tpm",
        metavar="TCTI",
        help="keep the anti-rollback floor in this TPM's NV counters and the device key in "
        "the TPM (e.g. device:/dev/tpmrm0, tabrmd:bus_name=com.intel.tss2.Tabrmd; a "
        "TPM-held TLS key needs a resource manager, not a raw swtpm: TCTI)",
    )
    dinit.add_argument(
        "--unsafe-file-key",
        action="store_true",
        help="development only: keep the device key in a file even with --tpm (warns)",
    )
    dinit.set_defaults(func=_device_init)
    denr = dev.add_parser(
        "enroll",
        help="generate the device key (in the TPM when configured) and get its certificate "
        "with an enrollment token",
        allow_abbrev=False,
    )
    denr.add_argument("device_dir", type=Path)
    denr.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the enrollment token (or ${ENROLL_TOKEN_ENV})",
    )
    denr.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"the single-use enrollment token (prefer ${ENROLL_TOKEN_ENV}: argv is visible "
        "to other local users; the token is useless once used or after it expires)",
    )
    denr.add_argument(
        "--factory-cert",
        type=Path,
        metavar="PEM",
        help="enroll with this factory certificate (from the manufacturer) instead of a token",
    )
    denr.add_argument("--factory-key", type=Path, metavar="PEM", help="the factory key")
    denr.set_defaults(func=_device_enroll)

    man = sub.add_parser(
        "manufacturer", help="manufacturer side of factory enrollment (development)"
    ).add_subparsers(dest="manufacturer_cmd", required=True)
    minit = man.add_parser("init", help="create a manufacturer CA (file key: warns)")
    minit.add_argument("dir", type=Path)
    minit.add_argument("--name", default="otaguard manufacturer CA", help="the CA's name")
    minit.set_defaults(func=_manufacturer)
    miss = man.add_parser(
        "issue", help="make a factory key and certificate for a device (file key: warns)"
    )
    miss.add_argument("dir", type=Path, help="the manufacturer CA directory")
    miss.add_argument("--serial", required=True)
    miss.add_argument("--hardware-id", required=True, metavar="HW")
    miss.add_argument(
        "--out", required=True, metavar="PREFIX", help="writes PREFIX.pem and PREFIX.key (0600)"
    )
    miss.add_argument(
        "--lifetime",
        type=_duration,
        default=dt.timedelta(days=3650),
        metavar="DURATION",
        help="validity of the factory certificate (default 3650d)",
    )
    miss.set_defaults(func=_manufacturer)

    ag = sub.add_parser("agent", help="run the device agent")
    ag.add_argument(
        "device_dir",
        type=Path,
        nargs="?",
        help="the device directory (default: device_dir in the config file)",
    )
    ag.add_argument(
        "action",
        choices=(
            "check",
            "update",
            "run",
            "status",
            "boot",
            "measure-boot",
            "mark-good",
            "clear-rejected",
        ),
        help="measure-boot: hash the booted slot once per boot and log it as an unattested "
        "boot measurement, for a bootloader that measures nothing "
        "(otaguard-measure-boot.service); mark-good: confirm the running slot to the "
        "bootloader, committing an install that waited for this boot "
        "(otaguard-mark-good.service); clear-rejected: forget the images rolled back here "
        "so they may be selected again",
    )
    add_json_option(ag)
    _config_option(ag, "agent.toml")
    ag.add_argument(
        "--interval",
        type=_seconds,
        metavar="DURATION",
        help="run: seconds between polls, e.g. 300, 5m (default: the device's, 300 s)",
    )
    ag.add_argument(
        "--jitter",
        type=float,
        metavar="FRACTION",
        help="run: +/- this fraction of the interval, 0 to 0.5 (default 0.2)",
    )
    ag.add_argument(
        "--mqtt-url",
        metavar="URL",
        help="run: the MQTT broker, mqtts://HOST[:PORT]: telemetry over MQTT (HTTPS when "
        "it is down), check-in hints from it",
    )
    ag.add_argument(
        "--mqtt-ca",
        type=Path,
        metavar="PEM",
        help="run: CA of the broker's certificate (default: the provisioned server CA)",
    )
    ag.set_defaults(func=_agent, config_keys="agent")

    demo = sub.add_parser(
        "demo", help="end-to-end demo: rollout through the director and eight refused attacks"
    )
    demo.add_argument("--devices", type=int, default=20)
    demo.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    demo.add_argument(
        "--keep-serving",
        action="store_true",
        help="after the attacks, keep the server up for the dashboard until Ctrl-C",
    )
    demo.set_defaults(func=_demo)
    return p


def _logging(args: argparse.Namespace) -> None:
    """Configure the package's (and uvicorn's) logging: level from -v (a server logs
    INFO by default: where it listens, each request), format from the flag, config or
    environment."""
    base = getattr(args, "log_level", logging.WARNING)
    level = {0: base, 1: min(base, logging.INFO)}.get(args.verbose, logging.DEBUG)
    wanted = args.log_format or os.environ.get("OTAGUARD_LOG_FORMAT")
    # A bad value is named by the config check; logs stay readable meanwhile.
    configure_logging(level=level, fmt="json" if wanted == "json" else "text")


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    # Logging first with what argv and the environment say; a config file may then
    # change the format (its own errors are printed in the default one).
    _logging(args)
    warnings.simplefilter("always", InsecureModeWarning)
    warnings.showwarning = _show_warning
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _apply_config(args, argv)
        _logging(args)
        return func(args)
    except OtaguardError as e:
        err.print(e.diagnostics(), highlight=False, markup=False)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as e:
        from otaguard.cli._extras import missing_extra_message

        # An install without the command's extra (otaguard[agent] running 'server'):
        # an operator's fix, named in one line.
        if isinstance(e, ModuleNotFoundError) and (line := missing_extra_message(e)):
            err.print(f"error: {line}", markup=False, highlight=False)
            return OperatorError.exit_code
        logging.getLogger("otaguard").debug("unexpected error", exc_info=True)
        err.print(
            f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]}", markup=False
        )
        err.print("re-run with -vv for details", markup=False)
        return EXIT_INTERNAL
