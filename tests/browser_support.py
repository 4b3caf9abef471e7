"""Debian's headless Chromium driven by selenium through Debian's chromedriver.

The real browser, never a downloaded one: ``chromium`` and ``chromium-driver`` are
Debian packages (``make sysdeps``). Under ``CI=true`` a missing one fails the test
instead of skipping it. The browser trusts exactly the test server's key (its SPKI
pinned with ``--ignore-certificate-errors-spki-list``), reaches nothing but loopback (a
dead proxy and a host resolver that resolves nothing else), and keeps its profile in the
test's temporary directory.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

REPO_ROOT = Path(__file__).resolve().parents[1]
#: where screenshots go: $OTAGUARD_ARTEFACTS/dashboard, else test-artefacts/dashboard in
#: the repository (gitignored); read at import, before any fixture clears OTAGUARD_*
ARTEFACTS = Path(os.environ.get("OTAGUARD_ARTEFACTS") or REPO_ROOT / "test-artefacts") / "dashboard"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
#: seconds a page may take to show its data
PAGE_TIMEOUT = 15


def _found(name: str, candidates: tuple[str, ...]) -> str | None:
    return shutil.which(name) or next((c for c in candidates if Path(c).exists()), None)


def require_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skip (outside CI) or fail (in CI) without them."""
    browser = _found("chromium", CHROMIUM_CANDIDATES)
    driver = _found("chromedriver", CHROMEDRIVER_CANDIDATES)
    if browser is not None and driver is not None:
        return browser, driver
    missing = [p for p, f in (("chromium", browser), ("chromium-driver", driver)) if f is None]
    reason = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def spki_pin(base_url: str) -> str:
    """base64 SHA-256 of the server certificate's public key, as Chromium pins it."""
    where = urlsplit(base_url)
    assert where.hostname is not None and where.port is not None
    pem = ssl.get_server_certificate((where.hostname, where.port))
    spki = (
        x509.load_pem_x509_certificate(pem.encode())
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def start_chromium(base_url: str, profile: Path) -> Any:
    """A headless Chromium for ``base_url`` (HTTPS, its key pinned); the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = require_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
        f"--ignore-certificate-errors-spki-list={spki_pin(base_url)}",
        # Nothing but loopback: every other host goes to a dead proxy and resolves nowhere.
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--no-first-run",
        "--no-default-browser-check",
        "--no-pings",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-domain-reliability",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--disable-client-side-phishing-detection",
        "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # selenium-manager would look for (and download) a driver: the path is given instead.
    service = Service(executable_path=driver)
    return webdriver.Chrome(options=opts, service=service)
