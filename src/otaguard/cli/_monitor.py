"""CLI of fleet monitoring: ``alerts list/ack``, ``server mqtt-files`` and the server's
monitoring options. Thin: parsing and printing; the server's operator API does the rest."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from otaguard.cli._cli import out
from otaguard.model.errors import OperatorError

__all__ = [
    "add_alerts_parser",
    "add_monitor_server_options",
    "add_mqtt_files_parser",
    "monitor_settings",
]

#: the webhook HMAC secret is read from a file (never argv); its size is bounded
MAX_SECRET_FILE_BYTES = 4096


def _alerts(a: argparse.Namespace) -> int:
    from otaguard.cli._ops import remote_args
    from otaguard.server.alert_client import AlertClient

    server, ca, token = remote_args(a)
    with AlertClient(server_url=server, ca_cert=ca, token=token) as client:
        if a.alerts_cmd == "ack":
            shown = [client.ack(i) for i in a.ids]
        else:
            shown = client.alerts(include_acked=a.all, limit=a.limit)
    for alert in shown:
        state = f"acked by {alert.acked_by}" if alert.acked_at else "open"
        out.print(
            f"#{alert.id} {alert.time:%Y-%m-%d %H:%M:%S} {alert.signal} {alert.subject} "
            f"[{state}]\n  observed: {alert.observed}\n  threshold: {alert.threshold}\n"
            f"  action: {alert.action} ({alert.outcome})\n  {alert.detail}",
            markup=False,
            highlight=False,
        )
    if not shown:
        out.print("no open alerts" if a.alerts_cmd == "list" else "nothing acknowledged")
    return 0


def add_alerts_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``alerts list [--all]`` (viewer) and ``alerts ack ID...`` (operator)."""
    from otaguard.cli._ops import remote_options

    al = sub.add_parser("alerts", help="fleet alerts: list, acknowledge").add_subparsers(
        dest="alerts_cmd", required=True
    )
    ls = al.add_parser("list", help="open alerts, newest first (--all: acknowledged too)")
    ls.add_argument("--all", action="store_true", help="acknowledged alerts too")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    remote_options(ls)
    ls.set_defaults(func=_alerts)
    ack = al.add_parser("ack", help="acknowledge alerts (operator); audited")
    ack.add_argument("ids", type=int, nargs="+", metavar="ID")
    remote_options(ack)
    ack.set_defaults(func=_alerts)


def _mqtt_files(a: argparse.Namespace) -> int:
    from otaguard.server.mqtt import write_broker_files

    written = write_broker_files(a.data, host=a.host, out=a.out)
    for path in written:
        out.print(str(path), markup=False, highlight=False)
    return 0


def add_mqtt_files_parser(srv_cmds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``server mqtt-files --data DATA --host HOST --out DIR``: the broker's TLS files."""
    p = srv_cmds.add_parser(
        "mqtt-files",
        help="write the Mosquitto broker's certificate and the device CA chain "
        "(deploy/mosquitto/README.md)",
    )
    p.add_argument("--data", type=Path, required=True, help="server data directory")
    p.add_argument("--host", required=True, help="the broker's host name or address")
    p.add_argument("--out", type=Path, required=True, help="directory to write them to")
    p.set_defaults(func=_mqtt_files)


def add_monitor_server_options(srv: argparse.ArgumentParser) -> None:
    """The ``server`` options of fleet monitoring (ADR 0026)."""
    g = srv.add_argument_group("fleet monitoring")
    g.add_argument(
        "--monitor-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between anomaly sweeps (silence, cohorts, phases); default 30",
    )
    g.add_argument(
        "--device-poll-interval",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how often devices poll; silence is counted in it; default 3600",
    )
    g.add_argument(
        "--silent-intervals",
        type=int,
        default=3,
        metavar="N",
        help="missed polls after an install before an alert; default 3",
    )
    g.add_argument(
        "--alert-policy",
        default="",
        metavar="SIGNAL=ACTION,...",
        help="override actions (record, quarantine, pause-rollout) per signal",
    )
    g.add_argument(
        "--webhook",
        action="append",
        metavar="URL",
        help="POST each new alert here (HMAC-signed); repeatable",
    )
    g.add_argument(
        "--webhook-secret-file",
        type=Path,
        metavar="FILE",
        help="the webhooks' HMAC secret (a file, never argv)",
    )
    g.add_argument("--mqtt-host", metavar="HOST", help="MQTT broker (Mosquitto, mutual TLS)")
    g.add_argument("--mqtt-port", type=int, default=8883, help="its TLS port; default 8883")
    g.add_argument("--mqtt-ca", type=Path, metavar="PEM",
                   help="CA of the broker's certificate; default the server's TLS CA")  # fmt: skip


def _secret(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        if path.stat().st_size > MAX_SECRET_FILE_BYTES:
            raise OperatorError(f"webhook secret file {path} is larger than 4 KiB")
        secret = path.read_bytes().strip()
    except OSError as e:
        raise OperatorError(f"cannot read webhook secret file {path}: {e.strerror}") from e
    if len(secret) < 16:
        raise OperatorError(f"webhook secret in {path} is shorter than 16 bytes")
    return secret


def monitor_settings(a: argparse.Namespace) -> dict[str, Any]:
    """:class:`~otaguard.server.settings.ServerSettings` keywords of those options."""
    return {
        "monitor_interval": a.monitor_interval,
        "device_poll_interval": a.device_poll_interval,
        "silent_intervals": a.silent_intervals,
        "alert_policy": a.alert_policy,
        "webhook_urls": tuple(a.webhook or ()),
        "webhook_secret": _secret(a.webhook_secret_file),
        "mqtt_host": a.mqtt_host or os.environ.get("OTAGUARD_MQTT_HOST") or None,
        "mqtt_port": a.mqtt_port,
        "mqtt_ca": a.mqtt_ca,
    }
