"""A private SoftHSM2 token per test: its own configuration and token directory.

CI (``CI=true``) must run what it claims to run, so a missing softhsm2 fails there and
skips elsewhere (``make sysdeps`` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from otaguard.crypto.hsm import PKCS11_MODULE_ENV

__all__ = ["SOFTHSM_MODULES", "SoftToken", "softhsm_module", "start_softhsm"]

#: where Debian and Fedora put SoftHSM2's PKCS#11 module
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)
TOKEN_LABEL = "otaguard-test"
USER_PIN = "4711-user"
SO_PIN = "0815-so"


@dataclass(frozen=True)
class SoftToken:
    """An initialised token: its label, PINs, module and configuration (in the env)."""

    label: str
    pin: str
    module: str
    conf: Path


def softhsm_module() -> str | None:
    """The SoftHSM2 module installed here, or None."""
    return next((m for m in SOFTHSM_MODULES if os.path.isfile(m)), None)


def start_softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    """Initialise a fresh token in ``tmp_path`` and point this process (and children) at it."""
    module = softhsm_module()
    missing = [
        n
        for n, ok in (("softhsm2", module), ("softhsm2-util", shutil.which("softhsm2-util")))
        if not ok
    ]
    if missing:
        reason = f"SoftHSM2 missing ({', '.join(missing)}): apt-get install softhsm2 opensc"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    assert module is not None
    tokens = tmp_path / "softhsm-tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    monkeypatch.setenv(PKCS11_MODULE_ENV, module)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
         "--pin", USER_PIN, "--so-pin", SO_PIN],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    # python-pkcs11 loads a module once per process and SoftHSM2 reads its configuration
    # and tokens when initialised: re-initialise, so this process sees this test's token.
    import pkcs11

    pkcs11.lib(module).reinitialize()
    return SoftToken(TOKEN_LABEL, USER_PIN, module, conf)
