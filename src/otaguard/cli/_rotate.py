"""``repo rotate``, ``repo stage-targets`` and ``director rotate``: change a role's keys in a
new root, and have targets signed by its new keys (ADR 0014)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from otaguard.model.errors import OperatorError

if TYPE_CHECKING:
    from otaguard.repo.rotation import NewKey

__all__ = ["add_director_rotate_parser", "add_repo_rotate_parser"]

_PUB_SUFFIX = ".pub.json"


def _new_key(uri: str) -> NewKey:
    """``--add-key``: ``hsm:…`` (public key from the token), ``encfile:PATH`` / ``file2:PATH``
    (public key from ``PATH.pub.json``), or ``PATH.pub.json`` alone for a key the update
    server holds (its online or director key)."""
    from otaguard.crypto.hsm import hsm_public_key, is_hsm_uri
    from otaguard.crypto.signers import file_uri_path, read_public_key
    from otaguard.repo.rotation import NewKey

    if is_hsm_uri(uri):
        return NewKey(hsm_public_key(uri), uri)
    path = file_uri_path(uri)
    if path is not None:
        pub = path.with_name(path.name + _PUB_SUFFIX)
        return NewKey(read_public_key(pub), f"{uri.partition(':')[0]}:{path.absolute()}")
    if uri.endswith(_PUB_SUFFIX) and ":" not in uri:
        return NewKey(read_public_key(Path(uri)), None)
    raise OperatorError(
        f"{uri}: give hsm:ID?label=TOKEN, encfile:PATH (with PATH.pub.json), or the update "
        "server's PATH.pub.json"
    )


def _hybrid(a: argparse.Namespace) -> bool | None:
    return None if a.hybrid is None else a.hybrid == "on"


def _console_print(lines: list[str]) -> None:
    from otaguard.cli._cli import out

    for line in lines:
        out.print(line, markup=False, highlight=False)


def _repo_rotate(a: argparse.Namespace) -> int:
    from otaguard.cli._cli import _secrets
    from otaguard.repo import ImageRepository
    from otaguard.repo.rotation import rotate, stage_rotation

    add = [_new_key(u) for u in a.add_key]
    if a.request is not None:
        repo = ImageRepository(a.repo_dir, keys_dir=a.keys_dir)
        request = stage_rotation(
            repo, role=a.role, add=add, remove=a.remove_key, threshold=a.threshold,
            out=a.request, expiry_days=a.expiry_days, hybrid=_hybrid(a),
        )  # fmt: skip
        _console_print(request.render())
        _console_print(
            [
                f"signing request: {a.request}",
                f"each root signer (current root and new): otaguard sign {a.request} --key URI",
                f"then: otaguard release publish {a.repo_dir} {a.request}",
            ]
        )
        return 0
    secrets = _secrets(a)
    repo = ImageRepository(a.repo_dir, passphrases=secrets, keys_dir=a.keys_dir)
    md, stale = rotate(
        repo, role=a.role, add=add, remove=a.remove_key, threshold=a.threshold,
        secrets=secrets, expiry_days=a.expiry_days, hybrid=_hybrid(a),
    )  # fmt: skip
    lines = [f"published root version {md.signed.version}: {a.role} keys rotated"]
    if a.role in ("snapshot", "timestamp") and repo.server_signed:
        lines.append(
            "restart the update server with the new online key (--online-key-uri URI or "
            "DATA/online-key.pem): it signs snapshot and timestamp for the new root"
        )
    lines += [f"{role} still needs its new keys' signatures: otaguard repo refresh "
              f"{a.repo_dir} --role {role}" for role in stale]  # fmt: skip
    _console_print(lines)
    return 0


def _stage_targets(a: argparse.Namespace) -> int:
    from otaguard.repo import ImageRepository
    from otaguard.repo.rotation import stage_targets

    repo = ImageRepository(a.repo_dir)
    out = a.out or Path(f"targets-{repo.latest_version('targets') + 1}.request.json")
    request = stage_targets(repo, out=out)
    _console_print([*request.render(), f"signing request: {out}"])
    return 0


def _director_rotate(a: argparse.Namespace) -> int:
    from otaguard.cli._cli import _secrets
    from otaguard.repo.director import rotate_director

    md = rotate_director(
        a.director_dir, role=a.role, add=[_new_key(u) for u in a.add_key],
        remove=a.remove_key, threshold=a.threshold, keys_dir=a.keys_dir,
        passphrases=_secrets(a),
    )  # fmt: skip
    lines = [f"wrote director root version {md.signed.version}: {a.role} keys rotated"]
    if a.role == "targets":
        lines.append(
            "restart the update server with the new director key (--director-key-uri URI "
            "or DATA/director-key.pem): devices follow the new root at their next check-in"
        )
    _console_print(lines)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--add-key",
        action="append",
        default=[],
        metavar="URI",
        help="repeatable: hsm:ID?label=TOKEN, encfile:PATH (public key PATH.pub.json), or the "
        "update server's PATH.pub.json for its online/director key",
    )
    p.add_argument(
        "--remove-key",
        action="append",
        default=[],
        metavar="ID",
        help="repeatable: key name (see 'otaguard key list'), key id or id prefix",
    )
    p.add_argument("--threshold", type=int, metavar="K", help="the role's new threshold")


def add_repo_rotate_parser(repo: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``repo rotate`` and ``repo stage-targets``."""
    from otaguard.cli._cli import _key_options

    rot = repo.add_parser(
        "rotate",
        help="add/remove a role's keys in a new root signed by the old and new root keys",
    )
    rot.add_argument("repo_dir", type=Path)
    rot.add_argument("--role", required=True, choices=("root", "targets", "snapshot", "timestamp"))
    _common(rot)
    rot.add_argument(
        "--request",
        type=Path,
        metavar="OUT",
        help="root keys on several machines: write a signing request for the ceremony "
        "(otaguard sign, release publish) instead of signing here",
    )
    rot.add_argument("--expiry-days", type=int, metavar="DAYS", help="new root's lifetime")
    rot.add_argument(
        "--hybrid",
        choices=("on", "off"),
        help="set or clear the role's hybrid policy (a classical and an ML-DSA signature); "
        "default: unchanged. Devices accept 'off' only signed hybrid by the current root keys",
    )
    _key_options(rot)
    rot.set_defaults(func=_repo_rotate)
    st = repo.add_parser(
        "stage-targets",
        help="write a signing request for the current targets again (new keys, new expiry)",
    )
    st.add_argument("repo_dir", type=Path)
    st.add_argument("--out", type=Path, metavar="REQUEST", help="default targets-N.request.json")
    st.set_defaults(func=_stage_targets)


def add_director_rotate_parser(
    director: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """``director rotate``."""
    from otaguard.cli._cli import _plaintext_option

    rot = director.add_parser(
        "rotate", help="rotate the director root's keys or the server's director key"
    )
    rot.add_argument("director_dir", type=Path)
    rot.add_argument("--role", required=True, choices=("root", "targets"))
    _common(rot)
    rot.add_argument("--keys-dir", type=Path, required=True, metavar="KEYS_DIR")
    _plaintext_option(rot, "the director's root keys are unencrypted")
    rot.set_defaults(func=_director_rotate)
