"""The offline k-of-n signing ceremony for targets: stage, sign (one key at a time), publish.

No single person, laptop or CI job can ship firmware when targets needs a threshold of
keys held by different people, on different machines, some in HSMs. The ceremony moves
one file between them, a *signing request*:

``stage`` (the release engineer, no key needed)
    checks the release as ``release add`` does, stores the image's blob, and writes the
    request: the exact canonical bytes of the next targets metadata, the bytes of the
    targets it replaces, a summary (images, hashes, lengths, versions, security flag,
    what changed), the role's keys and threshold, and no signature yet.
``sign`` (each signer, air-gapped)
    re-derives the summary from the bytes and refuses a request whose summary does not
    match them (what the signer reads is what the key signs), shows it, and adds one
    signature over the exact bytes, verified before it is written.
``publish`` (the release engineer)
    checks the request again, checks it extends the repository's current targets (a
    request staged against an older state is refused), counts the valid signatures by
    the keys the *repository's root* lists (never the request's own key list), refuses
    below threshold naming the missing signers, and writes the next targets version
    (and, server-less, snapshot and timestamp).

The request is parsed and checked in :class:`SigningRequest`'s constructor: a request
object that exists is internally consistent. See ADR 0013.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import Key, Signature
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets
from tuf.api.serialization import SerializationError
from tuf.api.serialization.json import CanonicalJSONSerializer

from otaguard._fs import atomic_write_json
from otaguard.crypto.hsm import hsm_public_key, is_hsm_uri
from otaguard.crypto.hybrid import check_hybrid, is_hybrid
from otaguard.crypto.signers import KeySecrets, file_uri_path, load_signer
from otaguard.model.errors import ConfigError, HybridPolicyError, OperatorError
from otaguard.model.errors import VerificationError as OtaVerifyError
from otaguard.model.release import ReleaseInfo
from otaguard.model.sbom import is_sbom_target
from otaguard.repo.repository import ImageRepository, Release

__all__ = [
    "MAX_REQUEST_BYTES",
    "REQUEST_FORMAT",
    "RequestKey",
    "SigningRequest",
    "next_root",
    "publish_request",
    "sign_request",
    "stage_release",
    "stage_root",
    "stage_root_change",
    "summarize",
]

logger = logging.getLogger(__name__)

REQUEST_FORMAT: Final = 1
# Two targets metadata (base and new) in base64, a few thousand targets each: far below
# this. Anything larger is not a request and is not parsed.
MAX_REQUEST_BYTES: Final = 32 * 1024 * 1024
_ROLE: Final = "targets"
#: the roles a ceremony signs, and their metadata classes
_SIGNED_CLASS: Final[dict[str, type[Root] | type[Targets]]] = {"targets": Targets, "root": Root}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise OtaVerifyError(f"signing request: {what} is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise OtaVerifyError(f"signing request: {what} is not base64") from e


def _parse(data: bytes, role: str, what: str) -> Root | Targets:
    """Parse canonical ``role`` bytes; refuse anything that does not re-serialize exactly.

    Canonical JSON (OLPC) escapes only ``\\`` and ``"``: a PEM public key keeps its raw
    newlines, which strict JSON forbids in strings, hence ``strict=False``.
    """
    try:
        signed = _SIGNED_CLASS[role].from_dict(json.loads(data, strict=False))
        canonical = _canonical(signed)
    except (ValueError, KeyError, TypeError, AttributeError, SerializationError) as e:
        raise OtaVerifyError(f"signing request: {what} is not {role} metadata: {e}") from e
    if canonical != data:
        raise OtaVerifyError(f"signing request: {what} are not canonical {role} bytes")
    return signed


def _parse_targets(data: bytes, what: str) -> Targets:
    signed = _parse(data, "targets", what)
    assert isinstance(signed, Targets)  # noqa: S101 - _parse returns the role's class
    return signed


def _canonical(signed: Root | Targets) -> bytes:
    return CanonicalJSONSerializer().serialize(signed)


def _image(path: str, tf: Any) -> dict[str, Any]:
    info = ReleaseInfo.from_custom(tf.custom)
    return {
        "path": path,
        "length": tf.length,
        "sha256": tf.hashes.get("sha256", ""),
        "version": str(info.version),
        "hardware_ids": list(info.hardware_ids),
        "security": info.release_type == "security",
        "security_counter": info.security_counter,
        # what the targets signature binds of the release's SBOM (None: published before
        # SBOMs were required; release tooling never stages one without)
        "sbom": None
        if info.sbom is None
        else {"path": info.sbom.path, "sha256": info.sbom.sha256, "length": info.sbom.length},
    }


def _summarize_root(new: Root, base: Root) -> dict[str, Any]:
    return {
        "role": "root",
        "version": new.version,
        "expires": new.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "replaces_version": base.version,
        "roles": {
            name: {
                "threshold": role.threshold,
                "keyids": sorted(role.keyids),
                "hybrid": is_hybrid(new, name),
            }
            for name, role in sorted(new.roles.items())
        },
        "added_keys": sorted(set(new.keys) - set(base.keys)),
        "removed_keys": sorted(set(base.keys) - set(new.keys)),
        "consistent_snapshot": bool(new.consistent_snapshot),
    }


def summarize(new: Root | Targets, base: Root | Targets) -> dict[str, Any]:
    """What a signer must read: derived from the bytes alone, so it cannot disagree."""
    if isinstance(new, Root) and isinstance(base, Root):
        return _summarize_root(new, base)
    if not isinstance(new, Targets) or not isinstance(base, Targets):
        raise OtaVerifyError("signing request: the replaced metadata is of another role")
    try:
        images = [
            _image(p, tf) for p, tf in sorted(new.targets.items()) if not is_sbom_target(tf.custom)
        ]
    except ValueError as e:
        raise OtaVerifyError(f"signing request: a target has invalid otaguard fields: {e}") from e
    changed = sorted(
        p for p in set(new.targets) & set(base.targets) if new.targets[p] != base.targets[p]
    )
    return {
        "role": _ROLE,
        "version": new.version,
        "expires": new.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "replaces_version": base.version,
        "images": images,
        "added": sorted(set(new.targets) - set(base.targets)),
        "removed": sorted(set(base.targets) - set(new.targets)),
        "changed": changed,
    }


@dataclass(frozen=True)
class RequestKey:
    """A key that may sign the request (as the repository's root listed it at staging)."""

    name: str
    keyid: str
    public_key: Key


class SigningRequest:
    """A parsed, internally consistent signing request.

    Raises:
        VerificationError: malformed, or its summary does not match its bytes, or a
            signature in it is not by one of its keys over its bytes.
    """

    def __init__(self, doc: Any):
        if not isinstance(doc, dict) or doc.get("otaguard_signing_request") != REQUEST_FORMAT:
            raise OtaVerifyError("not an otaguard signing request (or an unknown format)")
        role = doc.get("role")
        if not isinstance(role, str) or role not in _SIGNED_CLASS:
            raise OtaVerifyError(f"signing request for {role!r}: only targets or root")
        self.role: str = role
        self.signed_bytes = _unb64(doc.get("signed"), "the bytes to sign")
        self.base_bytes = _unb64(doc.get("base"), f"the replaced {role}")
        self.signed = _parse(self.signed_bytes, role, "the bytes to sign")
        self.base = _parse(self.base_bytes, role, f"the replaced {role}")
        self.summary = summarize(self.signed, self.base)
        if doc.get("summary") != self.summary:
            raise OtaVerifyError(
                "signing request: its summary does not match the bytes it asks to sign "
                "(altered after staging); refusing it"
            )
        if self.signed.version != self.base.version + 1:
            raise OtaVerifyError("signing request: its version does not follow the replaced one")
        try:
            self.root_version = int(doc["root_version"])
            self.threshold = int(doc["threshold"])
            self.keys = [
                RequestKey(k["name"], k["keyid"], Key.from_dict(k["keyid"], dict(k["public"])))
                for k in doc["keys"]
            ]
            self.signatures = {
                s["keyid"]: Signature(s["keyid"], s["sig"]) for s in doc["signatures"]
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OtaVerifyError(f"signing request: malformed keys or signatures: {e}") from e
        by_id = {k.keyid: k for k in self.keys}
        for keyid, sig in self.signatures.items():
            key = by_id.get(keyid)
            if key is None or not _valid(key.public_key, sig, self.signed_bytes):
                raise OtaVerifyError(
                    f"signing request: signature {keyid[:16]}… does not verify over its bytes"
                )

    @classmethod
    def load(cls, path: Path) -> SigningRequest:
        """Read and check a request file.

        Raises:
            ConfigError: unreadable or too large.
            VerificationError: as the constructor.
        """
        try:
            with Path(path).open("rb") as f:
                raw = f.read(MAX_REQUEST_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"cannot read signing request {path}: {e.strerror}") from e
        if len(raw) > MAX_REQUEST_BYTES:
            raise ConfigError(f"{path} is too large to be a signing request")
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise OtaVerifyError(f"{path} is not a signing request (not JSON)") from e
        return cls(doc)

    def to_json(self) -> dict[str, Any]:
        """The request file's content."""
        return {
            "otaguard_signing_request": REQUEST_FORMAT,
            "role": self.role,
            "root_version": self.root_version,
            "summary": self.summary,
            "signed": _b64(self.signed_bytes),
            "base": _b64(self.base_bytes),
            "threshold": self.threshold,
            "keys": [
                {"name": k.name, "keyid": k.keyid, "public": k.public_key.to_dict()}
                for k in self.keys
            ],
            "signatures": [s.to_dict() for s in self.signatures.values()],
        }

    def save(self, path: Path) -> None:
        """Write the request atomically."""
        atomic_write_json(Path(path), self.to_json())

    def signer_names(self, keyids: set[str]) -> list[str]:
        """Names of the keys among ``keyids``, in the request's order."""
        return [k.name for k in self.keys if k.keyid in keyids]

    def render(self) -> list[str]:
        """The summary as lines for a person to read before signing."""
        s = self.summary
        lines = [
            f"{self.role} version {s['version']} (replaces {s['replaces_version']}), "
            f"expires {s['expires']}",
            f"signatures: {len(self.signatures)} of {self.threshold} needed "
            f"({', '.join(self.signer_names(set(self.signatures))) or 'none yet'})",
        ]
        if self.role == "root":
            names = {k.keyid: k.name for k in self.keys}
            for role, r in s["roles"].items():
                keys = ", ".join(sorted(names.get(k, k[:16]) for k in r["keyids"]))
                hybrid = "  HYBRID (classical + ML-DSA)" if r["hybrid"] else ""
                lines.append(f"  {role}: {r['threshold']} of {len(r['keyids'])} ({keys}){hybrid}")
            lines.extend(f"+ key {names.get(k, '')} {k}" for k in s["added_keys"])
            lines.extend(f"- key {names.get(k, '')} {k}" for k in s["removed_keys"])
            return lines
        for img in s["images"]:
            mark = (
                "+" if img["path"] in s["added"] else ("~" if img["path"] in s["changed"] else " ")
            )
            lines.append(
                f"{mark} {img['path']}  version {img['version']}"
                f"{'  SECURITY' if img['security'] else ''}  counter {img['security_counter']}"
                f"  {img['length']} bytes  sha256 {img['sha256']}"
                f"  hardware {','.join(img['hardware_ids'])}"
            )
            sbom = img.get("sbom")
            lines.append(
                f"    SBOM {sbom['path']}  {sbom['length']} bytes  sha256 {sbom['sha256']}"
                if sbom
                else "    no SBOM"
            )
        lines.extend(f"- {p} (removed)" for p in s["removed"])
        return lines


def _valid(key: Key, sig: Signature, data: bytes) -> bool:
    try:
        key.verify_signature(sig, data)
    except (UnverifiedSignatureError, VerificationError):
        return False
    return True


def stage_release(
    repo: ImageRepository,
    image: Path,
    *,
    version: str,
    hardware_ids: list[str],
    security: bool,
    security_counter: int | None,
    sbom: Path,
    out: Path,
    now: datetime | None = None,
) -> tuple[SigningRequest, Release]:
    """Check a release and its SBOM (required), store their blobs and write the signing
    request ``out``; no key used. The summary shows the SBOM's digest.

    Raises:
        OperatorError: as :meth:`ImageRepository.add_release`, or ``out`` exists.
    """
    now = now or datetime.now(UTC)
    if Path(out).exists():
        raise OperatorError(f"{out} exists; refusing to overwrite a signing request")
    targets_md, info, name, checked = repo.check_new_release(
        image,
        version=version,
        hardware_ids=hardware_ids,
        security=security,
        security_counter=security_counter,
        sbom=sbom,
    )
    base_bytes = _canonical(targets_md.signed)
    release = repo.store_release(targets_md, Path(image), name, info, sbom=checked)
    new = targets_md.signed
    new.version += 1
    new.expires = repo.targets_expiry(now)
    root: Root = repo.latest_root()
    role = root.roles[_ROLE]
    names = {ref.keyid: ref.name for ref in repo.key_refs(_ROLE)}
    doc = {
        "otaguard_signing_request": REQUEST_FORMAT,
        "role": _ROLE,
        "root_version": root.version,
        "signed": _b64(_canonical(new)),
        "base": _b64(base_bytes),
        "threshold": role.threshold,
        "keys": [
            {"name": names.get(k, k[:16]), "keyid": k, "public": root.keys[k].to_dict()}
            for k in role.keyids
        ],
        "signatures": [],
    }
    doc["summary"] = summarize(new, _parse_targets(base_bytes, "the replaced targets"))
    request = SigningRequest(doc)
    request.save(out)
    logger.info("staged %s as targets version %s in %s", name, new.version, out)
    return request, release


def _match_key(request: SigningRequest, uri: str, key_name: str | None) -> RequestKey:
    """Which of the request's keys ``uri`` is: by name, by token key, or by file name."""
    if key_name is not None:
        found = [k for k in request.keys if k.name == key_name]
    elif is_hsm_uri(uri):
        keyid = hsm_public_key(uri).keyid
        found = [k for k in request.keys if k.keyid == keyid]
    elif (path := file_uri_path(uri)) is not None:
        found = [k for k in request.keys if k.name == path.stem]
    else:
        found = []
    if len(found) != 1:
        raise OperatorError(
            f"{uri} is not one of this request's keys "
            f"({', '.join(k.name for k in request.keys)}); name it with --key-name"
        )
    return found[0]


def sign_request(
    request: SigningRequest, *, uri: str, secrets: KeySecrets, key_name: str | None = None
) -> RequestKey:
    """Add one signature by the key ``uri`` (verified before it is kept).

    Raises:
        OperatorError: the key is not one of the request's, or has signed it already.
        KeyAccessError / ConfigError: as :func:`otaguard.crypto.signers.load_signer`.
        VerificationError: the signature made does not verify (a wrong key or token).
    """
    key = _match_key(request, uri, key_name)
    if key.keyid in request.signatures:
        raise OperatorError(f"key {key.name} has already signed this request")
    signer = load_signer(uri, key.public_key, name=key.name, secrets=secrets)
    sig = signer.sign(request.signed_bytes)
    if sig.keyid != key.keyid or not _valid(key.public_key, sig, request.signed_bytes):
        raise OtaVerifyError(f"the signature by {uri} does not verify as key {key.name}")
    request.signatures[key.keyid] = sig
    return key


def _counted(
    delegator: Root,
    request: SigningRequest,
    names: dict[str, str],
    *,
    what: str,
) -> set[str]:
    """Key ids of ``delegator``'s root-or-targets keys with a valid signature; refuse below
    its threshold, naming who signed and who is missing."""
    role = delegator.roles[request.role]
    valid = {
        keyid
        for keyid, sig in request.signatures.items()
        if keyid in role.keyids and _valid(delegator.keys[keyid], sig, request.signed_bytes)
    }
    if len(valid) < role.threshold:
        missing = [names.get(k, k[:16]) for k in role.keyids if k not in valid]
        have = [names.get(k, k[:16]) for k in role.keyids if k in valid]
        raise OperatorError(
            f"{what} needs {role.threshold} of {len(role.keyids)} signatures, has "
            f"{len(valid)} ({', '.join(have) or 'none'}); missing signers: {', '.join(missing)}"
        )
    return valid


def publish_request(
    repo: ImageRepository,
    request: SigningRequest,
    *,
    now: datetime | None = None,
    warn_stale: bool = True,
) -> Metadata[Any]:
    """Write the request's metadata as the repository's next version, if thresholds signed.

    After a new root, roles it no longer verifies are logged as needing new signatures,
    unless ``warn_stale`` is false (``repo rotate`` re-signs them itself at once).

    Targets needs a threshold of the newest root's targets keys. A new root needs a
    threshold of the current root's root keys *and* of its own (TUF §5.3.4), each named
    when missing.

    Raises:
        OperatorError: the repository changed since staging (stage again), the request
            expired, or fewer valid signatures than a threshold (names who is missing).
    """
    now = now or datetime.now(UTC)
    root: Root = repo.latest_root()
    current: Root | Targets = root if request.role == "root" else repo.latest_targets()
    if root.version != request.root_version or _canonical(current) != request.base_bytes:
        raise OperatorError(
            f"the repository changed since this request was staged ({request.role} version "
            f"{current.version}, root {root.version}); stage it again"
        )
    if request.signed.is_expired(now):
        raise OperatorError(f"the staged {request.role} metadata has expired; stage it again")
    names = {ref.keyid: ref.name for ref in repo.key_refs(request.role)}
    if request.role == "root":
        assert isinstance(request.signed, Root)  # noqa: S101 - parsed by role
        names |= {k.keyid: k.name for k in request.keys if k.keyid not in names}
        valid = _counted(root, request, names, what=f"root {root.version} (current)")
        valid |= _counted(request.signed, request, names, what=f"root {request.signed.version}")
        delegators = [root, request.signed]
    else:
        valid = _counted(root, request, names, what="targets")
        delegators = [root]
    md: Metadata[Any] = Metadata(request.signed, {k: request.signatures[k] for k in sorted(valid)})
    # python-tuf's own check, over the bytes it will serialise: what devices will do.
    try:
        for delegator in delegators:
            delegator.verify_delegate(request.role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as e:
        raise OtaVerifyError(f"python-tuf refuses the signed {request.role}: {e}") from e
    # and the hybrid policy devices add on top (ADR 0014): old and new root's for a root
    for delegator in delegators:
        try:
            check_hybrid(delegator, request.role, md.signed_bytes, md.signatures)
        except HybridPolicyError as e:
            raise OperatorError(f"{e}; a classical and an ML-DSA key must both sign") from e
    if request.role == "root":
        repo.write_signed_root(md)
        stale = repo.follow_root(root, now=now)
        for role in stale if warn_stale else ():
            logger.warning(
                "%s no longer verifies under root %s: sign it with the new keys "
                "(otaguard repo refresh --role %s, or the next release)",
                role,
                md.signed.version,
                role,
            )
    else:
        repo.write_signed_targets(md, now=now)
    logger.info("published %s version %s", request.role, request.signed.version)
    return md


def stage_root(
    repo: ImageRepository,
    *,
    out: Path,
    expiry_days: int | None = None,
    now: datetime | None = None,
) -> SigningRequest:
    """Write a signing request for the next root version with a new expiry.

    The keys and thresholds stay as they are (changing them is rotation,
    :mod:`otaguard.repo.rotation`). Signed by a threshold of the root keys, it extends the
    root's life.

    Raises:
        OperatorError: ``out`` exists, or an invalid expiry.
    """
    now = now or datetime.now(UTC)
    if Path(out).exists():
        raise OperatorError(f"{out} exists; refusing to overwrite a signing request")
    new = next_root(repo.latest_root())
    new.expires = repo.root_expiry(now, days=expiry_days)
    return stage_root_change(repo, new, out=out)


def next_root(current: Root) -> Root:
    """A copy of ``current`` with the next version (expiry and keys still to set)."""
    new = Root.from_dict(json.loads(_canonical(current), strict=False))
    new.version += 1
    return new


def stage_root_change(
    repo: ImageRepository, new: Root, *, out: Path, names: dict[str, str] | None = None
) -> SigningRequest:
    """Write the signing request for ``new``, the next root (``repo stage-root``, ``repo
    rotate``): every current and new root key may sign, each named.

    Args:
        repo: the repository whose newest root ``new`` replaces.
        new: the next root, keys and expiry set.
        out: the request file (must not exist).
        names: names of keys the repository config does not know yet (added keys).

    Raises:
        OperatorError: ``out`` exists, or ``new`` is not the next version.
    """
    if Path(out).exists():
        raise OperatorError(f"{out} exists; refusing to overwrite a signing request")
    current = repo.latest_root()
    if new.version != current.version + 1:
        raise OperatorError("the staged root is not the next version")
    base_bytes = _canonical(current)
    role = new.roles["root"]
    names = {**(names or {}), **{ref.keyid: ref.name for ref in repo.key_refs("root")}}
    keyids = list(dict.fromkeys([*current.roles["root"].keyids, *role.keyids]))
    all_keys = {**current.keys, **new.keys}
    doc: dict[str, Any] = {
        "otaguard_signing_request": REQUEST_FORMAT,
        "role": "root",
        "root_version": current.version,
        "signed": _b64(_canonical(new)),
        "base": _b64(base_bytes),
        "threshold": role.threshold,
        "keys": [
            {"name": names.get(k, k[:16]), "keyid": k, "public": all_keys[k].to_dict()}
            for k in keyids
        ],
        "signatures": [],
        "summary": _summarize_root(new, current),
    }
    request = SigningRequest(doc)
    request.save(out)
    logger.info("staged root version %s in %s", new.version, out)
    return request
