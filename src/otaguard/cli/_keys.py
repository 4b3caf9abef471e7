"""``key generate|list``, ``sign``, ``release stage|publish`` and ``repo init``'s k-of-n options."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from otaguard.cli._transfer import add_transfer_options, transfer_request
from otaguard.model.errors import ConfigError, OperatorError

if TYPE_CHECKING:
    from rich.console import Console

    from otaguard.repo.keyspec import ExternalKey, RoleKeySpec

__all__ = [
    "add_ceremony_parsers",
    "add_key_parsers",
    "add_kofn_options",
    "add_root_ceremony_parser",
    "key_specs",
]

_OFFLINE = ("root", "targets")


def _console() -> Console:
    from otaguard.cli._cli import out

    return out


# -- repo init: k-of-n ---------------------------------------------------------------
def add_kofn_options(init: argparse.ArgumentParser) -> None:
    """``--{root,targets}-keys N``, ``--…-threshold K``, ``--…-key URI`` on ``repo init``."""
    for role in _OFFLINE:
        init.add_argument(
            f"--{role}-keys",
            type=int,
            metavar="N",
            help=f"{role} keys in all (default: the hybrid pair plus any --{role}-key); "
            "those not given by URI are generated, alternating Ed25519 and ML-DSA-65",
        )
        init.add_argument(
            f"--{role}-threshold",
            type=int,
            metavar="K",
            help=f"how many {role} keys must sign (default: all of them)",
        )
        init.add_argument(
            f"--{role}-key",
            action="append",
            default=[],
            metavar="URI",
            help="an existing key by URI, repeatable: hsm:ID?label=TOKEN (public key read "
            "from the token) or encfile:PATH (public key from PATH.pub.json, as 'key "
            "generate' writes it)",
        )


def _external(uri: str) -> ExternalKey:
    from otaguard.crypto.hsm import hsm_public_key, is_hsm_uri
    from otaguard.crypto.signers import file_uri_path, read_public_key
    from otaguard.repo.keyspec import ExternalKey

    if is_hsm_uri(uri):
        return ExternalKey(uri, hsm_public_key(uri))
    path = file_uri_path(uri)
    if path is None:
        raise OperatorError(
            f"{uri}: repo init takes hsm: and file keys by URI; other keys need their "
            "public key (library: otaguard.repo.keyspec.ExternalKey)"
        )
    pub = path.with_name(path.name + ".pub.json")
    return ExternalKey(f"{uri.partition(':')[0]}:{path.absolute()}", read_public_key(pub))


def key_specs(a: argparse.Namespace) -> dict[str, RoleKeySpec]:
    """The k-of-n policy ``repo init`` was given (roles not mentioned keep the default)."""
    from otaguard.repo.keyspec import ROLE_ALGORITHMS, RoleKeySpec

    specs = {}
    for role in _OFFLINE:
        count, threshold = getattr(a, f"{role}_keys"), getattr(a, f"{role}_threshold")
        uris: list[str] = getattr(a, f"{role}_key")
        if count is None and threshold is None and not uris:
            continue
        external = tuple(_external(u) for u in uris)
        if count is None:
            count = len(ROLE_ALGORITHMS[role]) + len(external)
        specs[role] = RoleKeySpec(count, count if threshold is None else threshold, external)
    return specs


# -- key generate | list ----------------------------------------------------------------
def _key_generate(a: argparse.Namespace) -> int:
    from otaguard.cli._cli import _passphrases
    from otaguard.crypto.hsm import generate_hsm_key, is_hsm_uri, parse_hsm_uri
    from otaguard.crypto.keys import generate_signer, write_private_key
    from otaguard.crypto.signers import (
        ENCRYPTED_FILE_SCHEME,
        PLAINTEXT_FILE_SCHEME,
        file_uri_path,
        write_public_key,
    )
    from otaguard.model.unsafe import Unsafe

    out = _console()
    uri: str = a.uri
    if is_hsm_uri(uri):
        from urllib import parse

        key_id, label = parse_hsm_uri(uri)
        if label is None:
            raise OperatorError("name the token: hsm:ID?label=TOKEN (or hsm:?label=TOKEN)")
        explicit = parse.urlparse(uri).path != ""
        pin = _passphrases(new=False)(a.name).decode("utf-8", "surrogateescape")
        made = generate_hsm_key(
            token_label=label,
            pin=pin,
            algorithm=a.algorithm or "ecdsa-p256",
            key_label=a.name,
            key_id=key_id if explicit else None,
        )
        uri, public = made.uri, made.public_key
        pub_path = a.out
    else:
        path = file_uri_path(uri)
        scheme = uri.partition(":")[0]
        if path is None:
            raise OperatorError(
                f"{uri}: a KMS key is created in the KMS; otaguard generates hsm: and encfile: keys"
            )
        if path.exists():
            raise OperatorError(f"{path} exists; refusing to overwrite a key")
        if scheme == PLAINTEXT_FILE_SCHEME and not a.insecure_plaintext_keys:
            raise OperatorError("file2: keys are unencrypted: only with --insecure-plaintext-keys")
        signer = generate_signer(a.algorithm or "ed25519")
        secret: bytes | Literal[Unsafe.PLAINTEXT_KEYS] = (
            Unsafe.PLAINTEXT_KEYS
            if scheme == PLAINTEXT_FILE_SCHEME
            else _passphrases(new=True)(a.name)
        )
        assert scheme in (ENCRYPTED_FILE_SCHEME, PLAINTEXT_FILE_SCHEME)  # noqa: S101
        write_private_key(path, signer, passphrase=secret)
        public = signer.public_key
        uri = f"{scheme}:{path.absolute()}"
        pub_path = a.out or path.with_name(path.name + ".pub.json")
    if pub_path is not None:
        write_public_key(pub_path, public)
    out.print(f"created key {public.keyid} ({public.scheme}) at {uri}", markup=False)
    if pub_path is not None:
        out.print(f"public key: {pub_path}", markup=False)
    return 0


def _where(uri: str | None) -> str:
    from otaguard.crypto.hsm import is_hsm_uri, parse_hsm_uri
    from otaguard.crypto.signers import ENCRYPTED_FILE_SCHEME, file_uri_path

    if uri is None:
        return "update server (online key)"
    if is_hsm_uri(uri):
        key_id, label = parse_hsm_uri(uri)
        return f"PKCS#11 token {label or '(any)'}, key id {key_id}"
    path = file_uri_path(uri)
    if path is not None:
        kind = "encrypted file" if uri.startswith(ENCRYPTED_FILE_SCHEME) else "PLAINTEXT file"
        return f"{kind} {path}"
    return f"{uri.partition(':')[0]} (passed to securesystemslib)"


def _key_list(a: argparse.Namespace) -> int:
    from otaguard.crypto.signers import resolve_key_uri
    from otaguard.repo.repository import CONFIG_NAME, KEYS_CONFIG_NAME, ImageRepository

    out = _console()
    rows: list[tuple[str, str, str, str, str]] = []
    if a.token is not None:
        from otaguard.crypto.hsm import list_hsm_keys
        from otaguard.repo.keyspec import algorithm_of

        for k in list_hsm_keys(a.token):
            rows.append((k.label, "-", algorithm_of(k.public_key), k.public_key.keyid, k.uri))
    elif a.path is not None and (a.path / CONFIG_NAME).is_file():
        repo = ImageRepository(a.path)
        root = repo.latest_root()
        for role in ("root", "targets", "snapshot", "timestamp"):
            threshold = root.roles[role].threshold
            for ref in repo.key_refs(role):
                rows.append(
                    (ref.name, f"{role} ({threshold} of {len(root.roles[role].keyids)})",
                     ref.algorithm, ref.keyid,
                     _where(resolve_key_uri(ref.uri, repo.keys_dir) if ref.uri else None))
                )  # fmt: skip
    elif a.path is not None and (a.path / KEYS_CONFIG_NAME).is_file():
        try:
            recorded = json.loads((a.path / KEYS_CONFIG_NAME).read_text())["keys"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read {a.path / KEYS_CONFIG_NAME}: {e}") from e
        for name, keyid in sorted(recorded.items()):
            role = name.split("-", 1)[0]
            pem = a.path / f"{name}.pem"
            where = f"file {pem}" if pem.exists() else "elsewhere (by URI)"
            rows.append((name, role, name.split("-", 1)[-1], str(keyid), where))
    else:
        raise OperatorError("give a repository, a keys directory or --token LABEL")
    for name, role, alg, keyid, where in rows:
        out.print(f"{name}  {role}  {alg}  {keyid[:16]}…  {where}", markup=False)
    return 0


def add_key_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``key generate``, ``key list`` and ``sign``."""
    from otaguard.cli._cli import _plaintext_option

    key = sub.add_parser("key", help="signing keys by URI").add_subparsers(
        dest="key_cmd", required=True
    )
    gen = key.add_parser("generate", help="create a key: in a PKCS#11 token or a file")
    gen.add_argument(
        "--uri",
        required=True,
        help="hsm:[ID]?label=TOKEN (made in the token; PIN as the key's passphrase) or "
        "encfile:PATH (encrypted PKCS#8, public key in PATH.pub.json)",
    )
    gen.add_argument(
        "--algorithm",
        choices=("ed25519", "ml-dsa-65", "ecdsa-p256", "ecdsa-p384"),
        help="default ed25519 for files, ecdsa-p256 in a token (tokens: ECDSA only)",
    )
    gen.add_argument("--name", default="otaguard-key", help="key name (label, passphrase)")
    gen.add_argument("--out", type=Path, metavar="PUB_JSON", help="write the public key here")
    _plaintext_option(gen, "allow an unencrypted file2: key")
    gen.set_defaults(func=_key_generate)
    lst = key.add_parser("list", help="each key's name, role, type, id and where it lives")
    lst.add_argument("path", type=Path, nargs="?", metavar="REPO_DIR|KEYS_DIR")
    lst.add_argument("--token", metavar="LABEL", help="list the keys in this PKCS#11 token")
    lst.set_defaults(func=_key_list)

    sign = sub.add_parser("sign", help="add one signature to a signing request (offline)")
    sign.add_argument("request", type=Path)
    sign.add_argument("--key", required=True, metavar="URI", help="hsm:…, encfile:PATH, …")
    sign.add_argument("--key-name", help="which of the request's keys this is, if not evident")
    sign.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _plaintext_option(sign, "the key is an unencrypted file2: key")
    sign.set_defaults(func=_sign)


# -- the ceremony ------------------------------------------------------------------------
def _stage(a: argparse.Namespace) -> int:
    from otaguard.repo import ImageRepository
    from otaguard.repo.ceremony import stage_release

    out = _console()
    repo = ImageRepository(a.repo_dir)
    target = a.out or Path(f"targets-{a.version}.request.json")
    request, rel = stage_release(
        repo,
        a.image,
        version=a.version,
        hardware_ids=a.hardware_id,
        security=a.security,
        security_counter=a.security_counter,
        sbom=a.sbom,
        out=target,
        transfer=transfer_request(a),
    )
    for line in request.render():
        out.print(line, markup=False, highlight=False)
    out.print(f"staged {rel.path}; signing request: {target}", markup=False)
    return 0


def _sign(a: argparse.Namespace) -> int:
    from otaguard.cli._cli import _secrets
    from otaguard.repo.ceremony import SigningRequest, sign_request

    out = _console()
    request = SigningRequest.load(a.request)
    for line in request.render():
        out.print(line, markup=False, highlight=False)
    if not a.yes:
        if not sys.stdin.isatty():
            raise OperatorError("confirm interactively, or pass --yes after reading the summary")
        if input("Sign this? Type 'yes': ").strip() != "yes":
            raise OperatorError("not signed")
    key = sign_request(request, uri=a.key, secrets=_secrets(a), key_name=a.key_name)
    request.save(a.request)
    out.print(
        f"signed as {key.name}: {len(request.signatures)} of {request.threshold} signatures",
        markup=False,
    )
    return 0


def _publish(a: argparse.Namespace) -> int:
    from otaguard.cli._cli import _secrets
    from otaguard.repo import ImageRepository
    from otaguard.repo.ceremony import SigningRequest, publish_request

    out = _console()
    request = SigningRequest.load(a.request)
    repo = ImageRepository(a.repo_dir, passphrases=_secrets(a), keys_dir=a.keys_dir)
    md = publish_request(repo, request)
    out.print(
        f"published {request.role} version {md.signed.version} "
        f"({len(md.signatures)} of {request.threshold} signatures)",
        markup=False,
    )
    if repo.server_signed and request.role == "targets":
        out.print("the update server signs snapshot and timestamp when it takes it")
    return 0


def _stage_root(a: argparse.Namespace) -> int:
    from otaguard.repo import ImageRepository
    from otaguard.repo.ceremony import stage_root

    out = _console()
    repo = ImageRepository(a.repo_dir)
    target = a.out or Path(f"root-{repo.latest_version('root') + 1}.request.json")
    request = stage_root(repo, out=target, expiry_days=a.expiry_days)
    for line in request.render():
        out.print(line, markup=False, highlight=False)
    out.print(f"signing request: {target}", markup=False)
    return 0


def add_root_ceremony_parser(repo: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``repo stage-root``."""
    sr = repo.add_parser(
        "stage-root",
        help="write a signing request for the next root version (new expiry; no key)",
    )
    sr.add_argument("repo_dir", type=Path)
    sr.add_argument("--expiry-days", type=int, metavar="DAYS", help="default: the root lifetime")
    sr.add_argument("--out", type=Path, metavar="REQUEST", help="default root-N.request.json")
    sr.set_defaults(func=_stage_root)


def add_ceremony_parsers(rel: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``release stage`` and ``release publish``."""
    from otaguard.cli._cli import _key_options

    st = rel.add_parser("stage", help="store an image and write a signing request (no key)")
    st.add_argument("repo_dir", type=Path)
    st.add_argument("image", type=Path)
    st.add_argument("--version", required=True, help="semantic version X.Y.Z")
    st.add_argument("--hardware-id", action="append", required=True, metavar="HW")
    st.add_argument("--security", action="store_true", help="security release (else feature)")
    st.add_argument("--security-counter", type=int, metavar="N")
    st.add_argument(
        "--sbom", type=Path, required=True, metavar="FILE", help="CycloneDX 1.5/1.6 JSON SBOM"
    )
    st.add_argument(
        "--out", type=Path, metavar="REQUEST", help="default targets-VERSION.request.json"
    )
    add_transfer_options(st)
    st.set_defaults(func=_stage)
    pub = rel.add_parser(
        "publish",
        help="write a request's targets (or root) if a threshold signed it (names who is missing)",
    )
    pub.add_argument("repo_dir", type=Path)
    pub.add_argument("request", type=Path)
    _key_options(pub)
    pub.set_defaults(func=_publish)
