"""The demo's release ceremony: a private SoftHSM2 token where installed, and two signers.

Where softhsm2 is installed (``softhsm2-util`` and its module), the demo makes a token of
its own in its working directory, points this process at it (``SOFTHSM2_CONF``,
``PYKCS11LIB``), and one of the three targets keys is made inside it (ECDSA P-256); the
release is signed 2-of-3 by the ML-DSA-65 file key and the token key. Without softhsm2 the
targets keys stay the hybrid pair and both file keys sign. See ADR 0013.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from otaguard.crypto.hsm import PKCS11_MODULE_ENV, generate_hsm_key
from otaguard.repo.ceremony import SigningRequest, publish_request, sign_request, stage_release
from otaguard.repo.keyspec import ExternalKey, RoleKeySpec
from otaguard.repo.repository import ImageRepository, Release
from otaguard.repo.transfer import TransferRequest

__all__ = ["DemoToken", "ceremony_release", "start_demo_token"]

#: where Debian and Fedora put SoftHSM2's PKCS#11 module
SOFTHSM_MODULES: Final = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)
TOKEN_LABEL: Final = "otaguard-demo"  # noqa: S105 - a token label, not a secret
#: the name ``repo init`` gives the token key (named after its algorithm)
HSM_KEY_NAME: Final = "targets-ecdsa-p256"


@dataclass(frozen=True)
class DemoToken:
    """The demo's token: its PIN (random) and the targets key made in it."""

    pin: str
    key_spec: RoleKeySpec


def start_demo_token(work: Path) -> DemoToken | None:
    """Initialise a SoftHSM2 token in ``work`` and make a targets key in it; None if absent."""
    module = next((m for m in SOFTHSM_MODULES if os.path.isfile(m)), None)
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        return None
    tokens = work / "tokens"
    tokens.mkdir(parents=True)
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ[PKCS11_MODULE_ENV] = module
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", pin, "--so-pin", so_pin],
        check=True,
        capture_output=True,
        timeout=60,
    )
    made = generate_hsm_key(
        token_label=TOKEN_LABEL, pin=pin, algorithm="ecdsa-p256", key_label=HSM_KEY_NAME
    )
    return DemoToken(pin, RoleKeySpec(3, 2, (ExternalKey(made.uri, made.public_key),)))


def ceremony_release(
    repo: ImageRepository,
    image: Path,
    *,
    version: str,
    hardware_id: str,
    security: bool,
    passphrase: Callable[[str], bytes],
    request: Path,
    sbom: Path,
    transfer: TransferRequest | None = None,
) -> tuple[Release, list[str]]:
    """Stage, sign by two signers (the token key among them if the targets role has one), publish.

    Returns:
        The release and the names of the keys that signed it.
    """
    _, release = stage_release(
        repo, image, version=version, hardware_ids=[hardware_id], security=security,
        security_counter=None, sbom=sbom, out=request, transfer=transfer,
    )  # fmt: skip
    refs = {r.name: r for r in repo.key_refs("targets")}
    names = (
        ["targets-ml-dsa-65", HSM_KEY_NAME]
        if HSM_KEY_NAME in refs
        else ["targets-ed25519", "targets-ml-dsa-65"]
    )
    for name in names:
        uri = refs[name].uri
        assert uri is not None  # noqa: S101 - offline keys have URIs
        if uri.startswith("encfile:") and not Path(uri.partition(":")[2]).is_absolute():
            uri = f"encfile:{repo.keys_dir / uri.partition(':')[2]}"
        signing = SigningRequest.load(request)
        sign_request(signing, uri=uri, secrets=passphrase, key_name=name)
        signing.save(request)
    publish_request(repo, SigningRequest.load(request))
    return release, names
