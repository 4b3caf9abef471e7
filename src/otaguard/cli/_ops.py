"""CLI commands of the inventory, groups, operator tokens and the audit log.

``fleet list/show/tag/untag``, ``group ...``, ``operator ...`` and ``audit`` talk to the
server's operator API (:class:`~otaguard.server.ops_client.OpsClient`); ``server operator
...`` works on the server's data directory (:class:`~otaguard.server.operator_admin.
LocalOperators`). Thin: parsing and printing only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from otaguard.cli._cli import (
    CA_ENV,
    SERVER_ENV,
    TOKEN_ENV,
    _operator_token,
    _RefuseSecret,
    _show_checkins,
    _when,
    out,
)
from otaguard.cli._output import add_json_option, emit_json, plain_columns
from otaguard.cli._rollouts import fleet_set_parser, group_set_parser
from otaguard.model.errors import OperatorError

if TYPE_CHECKING:
    from otaguard.server.ops_client import InventoryDevice, OpsClient

__all__ = ["add_ops_parsers", "add_server_operator_parser", "fleet_inventory_parsers"]

ROLES = ("viewer", "operator", "release-manager", "admin")


def remote_args(a: argparse.Namespace) -> tuple[str, Path | None, str]:
    """The server URL, its CA and the operator token of ``--server``, ``--ca`` and
    ``--token-file`` (or the environment), checked."""
    if not a.server:
        raise OperatorError(f"no server: pass --server URL or set {SERVER_ENV}")
    if a.ca is None and a.server.startswith("https://"):
        raise OperatorError(f"no server CA certificate: pass --ca FILE or set {CA_ENV}")
    return a.server, a.ca, _operator_token(a)


def _client(a: argparse.Namespace) -> OpsClient:
    from otaguard.server.ops_client import OpsClient

    server, ca, token = remote_args(a)
    return OpsClient(server_url=server, ca_cert=ca, token=token)


def remote_options(p: argparse.ArgumentParser) -> None:
    """``--server``, ``--ca``, ``--token-file`` (and the refused ``--token``)."""
    p.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV),
        metavar="URL",
        help=f"update server (or ${SERVER_ENV})",
    )
    env_ca = os.environ.get(CA_ENV)
    p.add_argument(
        "--ca",
        type=Path,
        default=Path(env_ca) if env_ca else None,
        help=f"CA certificate of the server (or ${CA_ENV})",
    )
    p.add_argument("--token-file", type=Path, help=f"operator token file (or ${TOKEN_ENV})")
    p.add_argument("--token", nargs="?", action=_RefuseSecret, help=argparse.SUPPRESS)


def _since(text: str) -> dt.datetime:
    """argparse type: an ISO 8601 time with a zone (``2026-11-22T08:00:00Z``), or a
    duration ago (``30m``, ``12h``, ``7d``)."""
    m = re.fullmatch(r"([0-9]+)([smhd])", text.strip())
    if m is not None:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        try:
            return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(m.group(1)) * unit)
        except OverflowError as e:
            raise argparse.ArgumentTypeError(f"--since {text!r} is too far back") from e
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use e.g. 2026-11-22T08:00:00Z or 24h (that long ago)"
        ) from e
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"time {text!r} needs a zone, e.g. a trailing Z")
    return when


# -- fleet list/show/tag/untag ----------------------------------------------------------
def _ago(d: InventoryDevice) -> str:
    return _when(d.last_checkin) if d.last_checkin is not None else "never"


def _fleet_list(a: argparse.Namespace) -> int:
    with _client(a) as client:
        devices = client.devices(group=a.group, where=a.where)
    if a.json:
        emit_json(devices)
        return 0
    rows = [["SERIAL", "HARDWARE", "STATUS", "VERSION", "LAST CHECK-IN", "TAGS", "GROUPS",
             "LAST RESULT"]]  # fmt: skip
    for d in devices:
        rows.append(
            [
                d.serial,
                d.hardware_id,
                d.status,
                d.running_version or "-",
                _ago(d),
                ",".join(f"{k}={v}" for k, v in d.tags.items()) or "-",
                ",".join(d.groups),
                " ".join((d.last_result or "-").split()),
            ]
        )
    for line in plain_columns(rows):
        out.print(line, markup=False, highlight=False)
    out.print(f"{len(devices)} device(s)", markup=False)
    return 0


def _fleet_show(a: argparse.Namespace) -> int:
    from otaguard.server.client import FleetClient

    with _client(a) as client:
        d = client.device(a.serial)
    with FleetClient(server_url=a.server, ca_cert=a.ca, token=_operator_token(a)) as fleet:
        info = fleet.show(a.serial)
        checkins = fleet.checkins(a.serial)
        assignment = fleet.assignment(a.serial)
    if a.json:
        emit_json(
            {
                "device": d,
                "registered": info.created_at,
                "changed": info.updated_at,
                "certificates": info.cert_serials,
                "director": None
                if assignment is None
                else {"mode": assignment[0], "release": assignment[1]},
                "attestation_key": checkins.attestation_key,
                "checkins": checkins.checkins,
                "alerts": [
                    {"time": when, "kind": kind, "detail": detail}
                    for when, kind, detail in checkins.alerts
                ],
            }
        )
        return 0

    def say(text: str) -> None:
        out.print(text, markup=False)

    say(f"device {d.serial}: {d.status}" + (f" ({d.reason})" if d.reason else ""))
    say(f"hardware id: {d.hardware_id}")
    say("tags: " + (" ".join(f"{k}={v}" for k, v in d.tags.items()) or "none"))
    say("groups: " + ", ".join(d.groups))
    say(f"running version: {d.running_version or 'unknown (never checked in)'}")
    say(f"last result: {d.last_result or '-'}")
    say(f"registered: {_when(info.created_at)}; changed: {_when(info.updated_at)}")
    say("certificates issued: " + (", ".join(info.cert_serials) if info.cert_serials else "none"))
    if assignment is not None:
        mode, version = assignment
        say(
            "director: "
            + {
                "release": f"assigned release {version}",
                "hold": "hold (instructs no update)",
            }.get(mode, "default (security releases and rollouts)")
        )
    _show_checkins(checkins)
    return 0


def _fleet_tag(a: argparse.Namespace) -> int:
    from otaguard.server.tags import check_tag_key, parse_tag_assignments

    try:
        if a.fleet_cmd == "tag":
            new, remove = parse_tag_assignments(a.tags), []
        else:
            new, remove = {}, [check_tag_key(k) for k in a.keys]
    except ValueError as e:
        raise OperatorError(str(e)) from e
    with _client(a) as client:
        tags = client.change_tags(a.serial, set_tags=new, remove=remove)
    out.print(
        f"device {a.serial} tags: " + (" ".join(f"{k}={v}" for k, v in tags.items()) or "none"),
        markup=False,
    )
    return 0


def fleet_inventory_parsers(fleet: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fleet list``, ``fleet show``, ``fleet tag``, ``fleet untag``."""
    lst = fleet.add_parser(
        "list", help="list devices: tags, groups, last check-in, version", allow_abbrev=False
    )
    lst.add_argument("--group", metavar="G", help="only devices in group G")
    lst.add_argument("--where", metavar="FILTER", help="only devices whose tags match k=v,k=v")
    remote_options(lst)
    add_json_option(lst)
    lst.set_defaults(func=_fleet_list)
    show = fleet.add_parser(
        "show", help="show one device, its tags, groups and last check-in", allow_abbrev=False
    )
    show.add_argument("serial", metavar="SERIAL")
    remote_options(show)
    add_json_option(show)
    show.set_defaults(func=_fleet_show)
    tag = fleet.add_parser("tag", help="set tags on a device (key=value ...)", allow_abbrev=False)
    tag.add_argument("serial", metavar="SERIAL")
    tag.add_argument("tags", nargs="+", metavar="KEY=VALUE")
    remote_options(tag)
    tag.set_defaults(func=_fleet_tag)
    untag = fleet.add_parser(
        "untag", help="remove tags from a device (key ...)", allow_abbrev=False
    )
    untag.add_argument("serial", metavar="SERIAL")
    untag.add_argument("keys", nargs="+", metavar="KEY")
    remote_options(untag)
    untag.set_defaults(func=_fleet_tag)
    fleet_set_parser(fleet)


# -- group -------------------------------------------------------------------------------
def _group(a: argparse.Namespace) -> int:
    with _client(a) as client:
        if a.group_cmd == "list":
            for g in client.groups():
                out.print(
                    f"{g.name} ({g.kind}" + (f": {g.where})" if g.where else ")"), markup=False
                )
            return 0
        if a.group_cmd == "create":
            g = client.create_group(a.name, where=a.where)
            kind = f"dynamic, where {g.where}" if g.where else "static"
            out.print(f"created group {g.name} ({kind})", markup=False)
            return 0
        if a.group_cmd == "delete":
            client.delete_group(a.name)
            out.print(f"deleted group {a.name}", markup=False)
            return 0
        if a.group_cmd == "add":
            g = client.change_members(a.name, add=a.serials)
        elif a.group_cmd == "remove":
            g = client.change_members(a.name, remove=a.serials)
        else:
            g = client.group(a.name)
    members = g.members or ()
    out.print(
        f"group {g.name} ({g.kind}" + (f": {g.where}" if g.where else "") + f"): "
        f"{len(members)} device(s)",
        markup=False,
    )
    if members:
        out.print(" ".join(members), markup=False)
    return 0


# -- operator tokens and audit -----------------------------------------------------------
def _print_new_operator(name: str, role: str, token: str) -> None:
    out.print(f"operator {name} (role {role}) created", markup=False)
    out.print(
        "its token (shown once, stored only as a hash; keep it in a 0600 file):", markup=False
    )
    # The token alone on the last line, for scripts (tail -n1 > file).
    out.print(token, markup=False)


def _operator(a: argparse.Namespace) -> int:
    with _client(a) as client:
        if a.operator_cmd == "add":
            new = client.add_operator(a.name, a.role)
            _print_new_operator(new.operator.name, new.operator.role, new.token)
            return 0
        if a.operator_cmd == "revoke":
            op = client.revoke_operator(a.name)
            out.print(f"revoked operator {op.name} (role {op.role})", markup=False)
            return 0
        ops = client.operators()
    _print_operators([(o.name, o.role, o.created_at, o.created_by, o.revoked_at) for o in ops])
    return 0


def _print_operators(
    rows: list[tuple[str, str, dt.datetime, str, dt.datetime | None]],
) -> None:
    for name, role, created, by, revoked in rows:
        state = f"revoked {_when(revoked)}" if revoked is not None else "active"
        out.print(f"{name} {role} {state} (created {_when(created)} by {by})", markup=False)
    out.print(f"{len(rows)} operator token(s); bootstrap admin: DATA/operator-token", markup=False)


def _audit(a: argparse.Namespace) -> int:
    from otaguard.server.audit_chain import verify_chain

    with _client(a) as client:
        if a.verify:
            entries = list(client.audit())
            count, head = verify_chain(entries)
            shown = [e for e in entries if a.since is None or e.time >= a.since]
        else:
            shown = list(client.audit(since=a.since))
    if a.json:
        doc: dict[str, object] = {"entries": shown}
        if a.verify:
            doc["verified"] = {"entries": count, "head": head}
        emit_json(doc)
        return 0
    for e in shown:
        out.print(
            f"{e.seq} {_when(e.time)} {e.actor}({e.role}) {e.action} {e.target or '-'} "
            f"{e.result}" + (f" [{e.detail}]" if e.detail else "") + f" id={e.request_id}",
            markup=False,
        )
    if a.verify:
        out.print(f"audit chain verified: {count} entries, head {head}", markup=False)
    return 0


def add_ops_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``group``, ``operator`` and ``audit``."""
    grp = sub.add_parser("group", help="device groups (static, dynamic, all)").add_subparsers(
        dest="group_cmd", required=True
    )

    def group_cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        p = grp.add_parser(name, help=help_text, allow_abbrev=False)
        if name != "list":
            p.add_argument("name", metavar="NAME")
        remote_options(p)
        p.set_defaults(func=_group)
        return p

    group_cmd("create", "create a static group, or a dynamic one with --where").add_argument(
        "--where", metavar="FILTER", help="tag filter of a dynamic group: key=value[,key=value]"
    )
    group_cmd("add", "add devices to a static group").add_argument("serials", nargs="+")
    group_cmd("remove", "remove devices from a static group").add_argument("serials", nargs="+")
    group_cmd("show", "a group and its members")
    group_cmd("list", "list groups")
    group_cmd("delete", "delete a group (its devices stay registered)")
    group_set_parser(grp)

    ops = sub.add_parser("operator", help="operator tokens and roles (admin)").add_subparsers(
        dest="operator_cmd", required=True
    )
    oadd = ops.add_parser(
        "add", help="make a token with a role; prints it once", allow_abbrev=False
    )
    oadd.add_argument("name", metavar="NAME")
    oadd.add_argument("--role", required=True, choices=ROLES)
    remote_options(oadd)
    oadd.set_defaults(func=_operator)
    olist = ops.add_parser("list", help="list operator tokens", allow_abbrev=False)
    remote_options(olist)
    olist.set_defaults(func=_operator)
    orev = ops.add_parser("revoke", help="revoke a token for good", allow_abbrev=False)
    orev.add_argument("name", metavar="NAME")
    remote_options(orev)
    orev.set_defaults(func=_operator)

    aud = sub.add_parser(
        "audit", help="the operator audit log; --verify checks its hash chain", allow_abbrev=False
    )
    aud.add_argument(
        "--since",
        type=_since,
        metavar="TIME",
        help="entries from TIME (ISO 8601 with zone, or 24h)",
    )
    aud.add_argument(
        "--verify",
        action="store_true",
        help="read the whole log and verify its hash chain (exit 3 naming the first bad entry)",
    )
    remote_options(aud)
    add_json_option(aud)
    aud.set_defaults(func=_audit)


# -- server operator (local, on the data directory) ------------------------------------------
def _server_operator(a: argparse.Namespace) -> int:
    from otaguard.server.auth import Role
    from otaguard.server.operator_admin import LocalOperators

    with LocalOperators(a.data, database_url=a.database_url or None) as local:
        if a.server_operator_cmd == "add":
            rec, token = local.add(a.name, role=Role(a.role))
            _print_new_operator(rec.name, rec.role, token)
            return 0
        if a.server_operator_cmd == "revoke":
            rec = local.revoke(a.name)
            out.print(f"revoked operator {rec.name} (role {rec.role})", markup=False)
            return 0
        recs = local.list()
    _print_operators([(r.name, r.role, r.created_at, r.created_by, r.revoked_at) for r in recs])
    return 0


def add_server_operator_parser(
    srv_cmds: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """``server operator add|list|revoke --data DIR``: tokens without a token (bootstrap)."""
    sop = srv_cmds.add_parser(
        "operator", help="operator tokens on the data directory (no token needed)"
    ).add_subparsers(dest="server_operator_cmd", required=True)
    for name, help_text in (
        ("add", "make a token with a role; prints it once"),
        ("list", "list operator tokens"),
        ("revoke", "revoke a token for good"),
    ):
        p = sop.add_parser(name, help=help_text)
        if name != "list":
            p.add_argument("name", metavar="NAME")
        if name == "add":
            p.add_argument("--role", required=True, choices=ROLES)
        p.add_argument("--data", type=Path, required=True, help="server data directory")
        # SUPPRESS: given before 'operator' or after it, both count; otherwise the
        # parent's default (OTAGUARD_DATABASE_URL) applies, as for 'server db'.
        p.add_argument(
            "--database-url",
            default=argparse.SUPPRESS,
            metavar="URL",
            help="the server's database when it is not DATA/otaguard.db (e.g. "
            "postgresql://…): the one the running server uses",
        )
        p.set_defaults(func=_server_operator)
