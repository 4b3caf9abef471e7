"""CLI commands of rollouts and channels: ``rollout ...``, ``group set``, ``fleet set``,
``release check``. Thin: parsing and printing; the server's operator API does the rest."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

from otaguard.cli._cli import out
from otaguard.cli._output import add_json_option, emit_json
from otaguard.model.errors import OperatorError

if TYPE_CHECKING:
    from otaguard.server.rollout_client import RolloutClient, RolloutInfo

__all__ = ["add_rollout_parsers", "fleet_set_parser", "group_set_parser", "release_check_parser"]


def _client(a: argparse.Namespace) -> RolloutClient:
    from otaguard.cli._ops import remote_args
    from otaguard.server.rollout_client import RolloutClient

    server, ca, token = remote_args(a)  # the same checks as every operator command
    return RolloutClient(server_url=server, ca_cert=ca, token=token)


def _phases(text: str) -> list[int]:
    """argparse type: ``1,10,50,100``."""
    if not re.fullmatch(r"[0-9]{1,3}(,[0-9]{1,3}){0,9}", text.strip()):
        raise argparse.ArgumentTypeError(
            f"invalid phases {text!r}: up to 10 percentages, e.g. 1,10,50,100"
        )
    return [int(p) for p in text.split(",")]


def _percent(text: str) -> int:
    """argparse type: an integer percentage."""
    if not re.fullmatch(r"[0-9]{1,3}", text.strip()) or int(text) > 100:
        raise argparse.ArgumentTypeError(f"invalid percentage {text!r}: 0 to 100")
    return int(text)


def _duration(text: str) -> int:
    """argparse type: ``2d``, ``12h``, ``30m``, ``0`` → seconds (at most 7 days)."""
    m = re.fullmatch(r"([0-9]{1,7})([smhd]?)", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: e.g. 2d, 12h, 30m")
    seconds = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds > 7 * 86400:
        raise argparse.ArgumentTypeError(f"security delay {text!r} is above 7 days")
    return seconds


def _print(r: RolloutInfo) -> None:
    def say(text: str) -> None:
        out.print(text, markup=False, highlight=False)

    say(
        f"rollout {r.name}: {r.release} to group {r.group}, {r.state}, phase {r.phase}/"
        f"{len(r.phases)} ({r.percent}%; phases {','.join(map(str, r.phases))})"
    )
    say(
        f"thresholds: success {r.success_threshold}%, failure {r.failure_threshold}%"
        + (f"; window {r.window}" if r.window else "")
    )
    if r.members is not None:
        say(
            f"members {r.members}, admitted {r.admitted}, succeeded {r.succeeded}, "
            f"failed {len(r.failed or ())}"
        )
    if r.reason:
        say(f"reason: {r.reason}")
    for serial, error in r.failed or ():
        say(f"  failed: {serial}: {error}")


def _rollout(a: argparse.Namespace) -> int:
    with _client(a) as client:
        if a.rollout_cmd == "list":
            rows = client.rollouts()
            if a.json:
                emit_json(rows)
                return 0
            for r in rows:
                out.print(
                    f"{r.name}  {r.release}  {r.group}  {r.state}  phase {r.phase}/"
                    f"{len(r.phases)} ({r.percent}%)",
                    markup=False,
                    highlight=False,
                )
            if not rows:
                out.print("no rollouts", markup=False)
            return 0
        if a.rollout_cmd == "create":
            r = client.create_rollout(
                release=a.release,
                group=a.group,
                phases=a.phases,
                success_threshold=a.success_threshold,
                failure_threshold=a.failure_threshold,
                window=a.window,
                name=a.name,
            )
        elif a.rollout_cmd == "status":
            r = client.rollout(a.name)
        else:
            r = client.rollout_action(a.name, a.rollout_cmd)
    if getattr(a, "json", False):
        emit_json(r)
        return 0
    _print(r)
    return 0


def _remote(p: argparse.ArgumentParser) -> None:
    from otaguard.cli._ops import remote_options

    remote_options(p)


def add_rollout_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``rollout create/list/status/pause/resume/cancel``."""
    ro = sub.add_parser("rollout", help="staged rollouts of feature releases").add_subparsers(
        dest="rollout_cmd", required=True
    )
    create = ro.add_parser("create", help="roll a release out to a group in phases")
    create.add_argument("--release", required=True, metavar="VERSION")
    create.add_argument("--group", required=True, metavar="G")
    create.add_argument(
        "--phases", type=_phases, default=[1, 10, 50, 100], help="percentages (default 1,10,50,100)"
    )
    create.add_argument(
        "--success-threshold",
        type=_percent,
        default=95,
        metavar="PCT",
        help="advance when this %% of admitted devices runs it (default 95)",
    )
    create.add_argument(
        "--failure-threshold",
        type=_percent,
        default=5,
        metavar="PCT",
        help="halt when more than this %% of admitted devices failed (default 5)",
    )
    create.add_argument("--window", metavar="'Mon-Fri 02:00-05:00'", help="UTC install window")
    create.add_argument("--name", metavar="N", help="default: GROUP-VERSION")
    _remote(create)
    create.set_defaults(func=_rollout)
    lst = ro.add_parser("list", help="list rollouts")
    _remote(lst)
    add_json_option(lst)
    lst.set_defaults(func=_rollout)
    for cmd, text in (
        ("status", "a rollout's phase, counts, and why it halted"),
        ("pause", "admit nobody new until resumed"),
        ("resume", "resume a paused or halted rollout"),
        ("cancel", "stop a rollout for good"),
    ):
        p = ro.add_parser(cmd, help=text)
        p.add_argument("name", metavar="NAME")
        _remote(p)
        if cmd == "status":
            add_json_option(p)
        p.set_defaults(func=_rollout)


def _group_set(a: argparse.Namespace) -> int:
    window = "" if a.no_window else a.window
    if a.features is None and a.security_delay is None and window is None:
        raise OperatorError("nothing to change: give --no-features/--features, "
                            "--security-delay or --window/--no-window")  # fmt: skip
    with _client(a) as client:
        g = client.set_group_channels(
            a.name,
            no_features=None if a.features is None else not a.features,
            security_delay_seconds=a.security_delay,
            window=window,
        )
    out.print(
        f"group {g.group}: features {'off' if g.no_features else 'on'}, security delay "
        f"{g.security_delay_seconds}s, window {g.window or 'none'}",
        markup=False,
        highlight=False,
    )
    return 0


def group_set_parser(grp: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``group set NAME [--no-features|--features] [--security-delay D] [--window W]``."""
    p = grp.add_parser("set", help="a group's channels: feature opt-out, security delay, window")
    p.add_argument("name", metavar="NAME")
    feat = p.add_mutually_exclusive_group()
    feat.add_argument("--no-features", dest="features", action="store_false", default=None,
                      help="opt out of feature releases (never of security releases)")  # fmt: skip
    feat.add_argument("--features", dest="features", action="store_true",
                      help="opt back in to feature releases")  # fmt: skip
    p.add_argument(
        "--security-delay",
        type=_duration,
        metavar="D",
        help="postpone security releases by D (e.g. 2d; at most 7d; 0 removes)",
    )
    win = p.add_mutually_exclusive_group()
    win.add_argument("--window", metavar="'Mon-Fri 02:00-05:00'",
                     help="maintenance window (UTC) for rollouts")  # fmt: skip
    win.add_argument("--no-window", action="store_true", help="remove the window")
    _remote(p)
    p.set_defaults(func=_group_set)


def _fleet_set(a: argparse.Namespace) -> int:
    with _client(a) as client:
        off = client.set_device_channels(a.serial, no_features=not a.features)
    out.print(f"{a.serial}: features {'off' if off else 'on'}", markup=False, highlight=False)
    return 0


def fleet_set_parser(fleet: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fleet set SERIAL --no-features|--features``."""
    p = fleet.add_parser("set", help="a device's feature opt-out", allow_abbrev=False)
    p.add_argument("serial", metavar="SERIAL")
    feat = p.add_mutually_exclusive_group(required=True)
    feat.add_argument("--no-features", dest="features", action="store_false",
                      help="opt out of feature releases (never of security releases)")  # fmt: skip
    feat.add_argument("--features", dest="features", action="store_true",
                      help="opt back in")  # fmt: skip
    _remote(p)
    p.set_defaults(func=_fleet_set)


def _release_check(a: argparse.Namespace) -> int:
    with _client(a) as client:
        found = client.release_check()
    for o in found:
        out.print(
            f"WARNING: release {o.version} ({o.target}) names hardware id "
            f"{', '.join(o.unknown_hardware_ids)}, which no registered device has",
            markup=False,
            highlight=False,
        )
    if not found:
        out.print("every release names a registered device's hardware id", markup=False)
    return 1 if found else 0


def release_check_parser(rel: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``release check``."""
    p = rel.add_parser("check", help="flag served releases for hardware no device has")
    _remote(p)
    p.set_defaults(func=_release_check)
