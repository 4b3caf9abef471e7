"""Production topology: a real nginx terminates mutual TLS in front of a real otaguard server.

nginx runs the shipped template (``deploy/nginx/otaguard.conf``) on a free loopback port
and connects to otaguard from 127.0.0.2, the one trusted proxy address; the tests
themselves connect directly from 127.0.0.1, an untrusted address.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import HW, World, start_world
from nginx_support import Nginx, start_nginx
from otaguard.agent import Device
from otaguard.agent.identity import build_csr, renew_if_due
from otaguard.crypto import CertificateAuthority
from otaguard.crypto.device_ca import DeviceCA
from otaguard.crypto.manufacturer import ManufacturerCA
from otaguard.model.errors import AccessDeniedError
from otaguard.model.unsafe import Unsafe
from otaguard.server.client import FleetClient
from otaguard.sim import SIM_HEALTH_COMMAND

PROXY = "127.0.0.2"  # nginx's source address, the only trusted proxy
TIMESTAMP = "/metadata/timestamp.json"
FILE_KEY = Unsafe.FILE_DEVICE_KEY


@dataclass
class Proxied:
    """otaguard behind nginx, with a server clock the tests can move."""

    world: World
    nginx: Nginx
    skew: list[dt.timedelta]
    manufacturer: ManufacturerCA

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.nginx.port}"

    @property
    def ca(self) -> Path:
        assert self.world.server.ca_cert is not None
        return self.world.server.ca_cert

    def fleet(self) -> FleetClient:
        return FleetClient(
            server_url=self.world.server.base_url,
            ca_cert=self.ca,
            token=self.world.server.operator_token,
        )

    def device(
        self, serial: str, *, enroll: bool = True, director_root: Path | None = None
    ) -> Device:
        """A device that talks to nginx, enrolled with a token and checked in through nginx."""
        dev = Device.provision(
            self.world.tmp / serial,
            server_url=self.url,
            root_json=self.world.repo.metadata_dir / "root.json",
            ca_pem=self.ca,
            hardware_id=HW,
            serial=serial,
            factory_image=self.world.image("1.0.0"),
            factory_version="1.0.0",
            health_command=SIM_HEALTH_COMMAND,
            director_root=director_root,
        )
        if enroll:
            self.world.enroll(dev)
            # Metadata is served only within a while of an accepted check-in (ADR 0007).
            dev.checkin()
        return dev


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    tmp = tmp_path_factory.mktemp("proxied")
    manufacturer = ManufacturerCA.create(tmp / "manufacturer", name="Acme factory CA")
    skew = [dt.timedelta(0)]
    world = start_world(
        tmp,
        clock=lambda: dt.datetime.now(dt.UTC) + skew[0],
        trusted_proxies=(PROXY,),
        manufacturer_ca=manufacturer.cert_path,
        director=True,
    )
    nginx = None
    try:
        world.release("1.0.0")
        data = world.server.data_dir
        client_ca = tmp / "client-ca.pem"
        client_ca.write_bytes(
            (data / "device-ca" / "chain.pem").read_bytes() + manufacturer.cert_path.read_bytes()
        )
        creds = CertificateAuthority.load_or_create(data / "ca").server_credentials(
            tmp / "nginx-tls", ["127.0.0.1"]
        )
        assert world.server.ca_cert is not None
        nginx = start_nginx(
            tmp / "nginx",
            {
                "SERVER_NAME": "localhost",
                "SERVER_CERT": str(creds.cert_path),
                "SERVER_KEY": str(creds.key_path),
                "CLIENT_CA": str(client_ca),
                "UPSTREAM": urlsplit(world.server.base_url).netloc,
                "UPSTREAM_CA": str(world.server.ca_cert),
                "UPSTREAM_NAME": "localhost",
                "PROXY_ADDRESS": PROXY,
            },
        )
        yield Proxied(world, nginx, skew, manufacturer)
    finally:
        if nginx is not None:
            nginx.stop()
        world.server.stop()


def _context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def request(
    p: Proxied,
    path: str,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    headers: dict[str, str] | None = None,
    direct_from: str | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, bytes]:
    """One request through nginx, or straight to otaguard from ``direct_from``."""
    if direct_from is None:
        host, port, source = "127.0.0.1", p.nginx.port, None
    else:
        url = urlsplit(p.world.server.base_url)
        host, port, source = url.hostname or "", url.port, (direct_from, 0)
    conn = http.client.HTTPSConnection(
        host, port, context=_context(p.ca, cert, key), timeout=10, source_address=source
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def reason(data: bytes) -> str:
    return str(json.loads(data)["error"])


def _refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def forwarded(cert_pem: bytes, verify: str = "SUCCESS") -> dict[str, str]:
    """The headers nginx sets: URL-encoded PEM ($ssl_client_escaped_cert), the result."""
    return {"X-Client-Cert": quote(cert_pem.decode(), safe=""), "X-Client-Verify": verify}


def _leaf(dev: Device) -> bytes:
    cert = x509.load_pem_x509_certificate(dev.paths.device_cert.read_bytes())
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_identity(
    tmp: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _self_issued(
    tmp: Path, name: str, *, cn: str, issuer_cn: str, not_after: dt.timedelta
) -> tuple[Path, Path, x509.Certificate]:
    """A certificate for ``cn`` signed by a throwaway key under the name ``issuer_cn``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + not_after)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = _write_identity(tmp, name, cert, key)
    return cert_path, key_path, cert


# -- through nginx ---------------------------------------------------------------------
def test_a_good_device_enrolls_and_updates_end_to_end_through_nginx(proxied: Proxied) -> None:
    dev = proxied.device("good")  # EST with its token, through nginx
    assert dev.config.server_url == proxied.url
    status, data = request(
        proxied, "/api/v1/device/whoami", cert=dev.paths.device_cert, key=dev.paths.device_key
    )
    assert status == 200, data
    body = json.loads(data)
    assert body["serial"] == "good" and body["status"] == "enrolled"
    # Renewal (EST simplereenroll, authenticated by the forwarded certificate) through nginx.
    old = x509.load_pem_x509_certificate(dev.paths.device_cert.read_bytes())
    renew_if_due(
        dev.paths, dev.config, key_store=FILE_KEY,
        now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=17),
    )  # fmt: skip
    new = x509.load_pem_x509_certificate(dev.paths.device_cert.read_bytes())
    assert new.serial_number != old.serial_number
    proxied.world.release("1.1.0")
    result = dev.update()  # metadata and the image (HTTP Range) through nginx
    assert result.outcome == "updated", result
    assert result.to_version == "1.1.0"
    # It really went through nginx, with the certificate forwarded.
    line = proxied.nginx.access_log_line("/api/v1/device/whoami", "CN=good")
    assert 'client_verify="SUCCESS"' in line


def test_no_client_certificate_through_nginx_is_refused(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="otaguard"):
        status, data = request(proxied, TIMESTAMP)
    assert status == 403
    assert "a client certificate is required" in reason(data)
    assert any(
        "a client certificate is required" in m and "presented subject: none" in m
        for m in _refusals(caplog)
    )


def test_another_cas_certificate_is_refused_by_nginx(proxied: Proxied, tmp_path: Path) -> None:
    proxied.device("victim")
    cert, key, _ = _self_issued(
        tmp_path, "evil", cn="victim", issuer_cn="evil CA", not_after=dt.timedelta(days=1)
    )
    status, data = request(proxied, TIMESTAMP, cert=cert, key=key)
    assert status == 400
    assert b"The SSL certificate error" in data
    assert "client SSL certificate verify error" in proxied.nginx.error_log
    # nginx's request log holds the reason and the presented subject.
    line = proxied.nginx.access_log_line('subject="CN=victim"', " 400 ")
    assert 'client_verify="FAILED:unable to verify the first certificate"' in line
    assert " 400 " in line


def test_an_expired_certificate_is_refused_through_nginx(proxied: Proxied, tmp_path: Path) -> None:
    dev = proxied.device("old")
    # The app's clock says the certificate expired (nginx's still accepts it): the app refuses.
    proxied.skew[0] = dt.timedelta(hours=25)
    try:
        status, data = request(
            proxied, TIMESTAMP, cert=dev.paths.device_cert, key=dev.paths.device_key
        )
    finally:
        proxied.skew[0] = dt.timedelta(0)
    assert status == 403
    assert "the client certificate of old expired at" in reason(data)
    # A certificate that has really expired, though the registry issued it: nginx refuses.
    ca = DeviceCA.load_or_create(proxied.world.server.data_dir / "device-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    cert = ca.issue(
        x509.load_der_x509_csr(build_csr(key, "old")),
        serial="old", hardware_id=HW, now=past, lifetime=dt.timedelta(hours=1),
    )  # fmt: skip
    proxied.world.server.app.state.devices.record_certificate(
        "old", format(cert.serial_number, "x"), not_after=cert.not_valid_after_utc, now=past
    )
    cert_path, key_path = _write_identity(tmp_path, "expired", cert, key)
    status, data = request(proxied, TIMESTAMP, cert=cert_path, key=key_path)
    assert status == 400
    assert b"The SSL certificate error" in data
    line = proxied.nginx.access_log_line('subject="CN=old"', " 400 ")
    assert 'client_verify="FAILED:certificate has expired"' in line


def test_a_revoked_device_is_refused_through_nginx(proxied: Proxied) -> None:
    dev = proxied.device("stolen")
    creds = {"cert": dev.paths.device_cert, "key": dev.paths.device_key}
    assert request(proxied, TIMESTAMP, **creds)[0] == 200
    with proxied.fleet() as fleet:
        fleet.revoke("stolen", "reported stolen")
    status, data = request(proxied, TIMESTAMP, **creds)
    assert status == 403
    assert reason(data) == "access denied: device stolen is revoked: reported stolen"


def test_a_quarantined_device_is_refused_through_nginx(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    dev = proxied.device("odd")
    with proxied.fleet() as fleet:
        fleet.quarantine("odd", "odd traffic")
        with caplog.at_level(logging.WARNING, logger="otaguard"):
            status, data = request(
                proxied, TIMESTAMP, cert=dev.paths.device_cert, key=dev.paths.device_key
            )
        assert status == 403
        assert reason(data) == "access denied: device odd is quarantined: odd traffic"
        assert any(
            "quarantined" in m and "CN=odd" in m and f"via proxy {PROXY}" in m
            for m in _refusals(caplog)
        )
        with pytest.raises(AccessDeniedError, match=r"HTTP 403"):
            dev.check()
        fleet.release("odd")
    assert dev.check() is not None


def test_a_client_cannot_set_the_forwarded_certificate_through_nginx(proxied: Proxied) -> None:
    victim = proxied.device("impersonated")
    # No TLS client certificate, but the headers nginx would set, naming a valid device.
    status, data = request(proxied, TIMESTAMP, headers=forwarded(_leaf(victim)))
    assert status == 403
    assert "a client certificate is required" in reason(data)


# -- straight to otaguard -----------------------------------------------------------------
def test_a_forwarded_certificate_from_an_untrusted_address_is_ignored(
    proxied: Proxied, caplog: pytest.LogCaptureFixture
) -> None:
    dev = proxied.device("spoofed")
    headers = {**forwarded(_leaf(dev)), "X-Forwarded-For": PROXY, "Forwarded": f"for={PROXY}"}
    with caplog.at_level(logging.WARNING, logger="otaguard"):
        status, data = request(proxied, TIMESTAMP, headers=headers, direct_from="127.0.0.1")
    assert status == 403
    assert "a client certificate is required" in reason(data)
    assert any(
        "ignored a forwarded client certificate header from 127.0.0.1" in m
        for m in _refusals(caplog)
    )
    # The same headers from the trusted proxy's address are taken (the control).
    status, data = request(proxied, TIMESTAMP, headers=forwarded(_leaf(dev)), direct_from=PROXY)
    assert status == 200, data


def test_a_forged_forwarded_certificate_is_refused_even_from_the_proxy(
    proxied: Proxied, tmp_path: Path
) -> None:
    proxied.device("target")
    # Named as if the device CA issued it, signed by another key: the app re-verifies.
    _, _, forged = _self_issued(
        tmp_path, "forged", cn="target", issuer_cn="otaguard device issuing CA",
        not_after=dt.timedelta(days=1),
    )  # fmt: skip
    pem = forged.public_bytes(serialization.Encoding.PEM)
    status, data = request(proxied, TIMESTAMP, headers=forwarded(pem), direct_from=PROXY)
    assert status == 403
    assert "signature does not verify against the device CA" in reason(data)
    # What the proxy did not verify does not count, and garbage is refused as such.
    dev = proxied.device("unverified")
    status, data = request(
        proxied, TIMESTAMP, headers=forwarded(_leaf(dev), "FAILED:expired"), direct_from=PROXY
    )
    assert status == 403
    assert "the proxy did not verify the forwarded client certificate" in reason(data)
    status, data = request(
        proxied,
        TIMESTAMP,
        headers={"X-Client-Cert": "not%20a%20certificate", "X-Client-Verify": "SUCCESS"},
        direct_from=PROXY,
    )
    assert status == 403
    assert "the forwarded client certificate is unreadable" in reason(data)


# -- factory enrollment through nginx -------------------------------------------------------
def test_factory_enrollment_through_nginx_and_the_factory_certificate_is_no_identity(
    proxied: Proxied, tmp_path: Path
) -> None:
    with proxied.fleet() as fleet:
        fleet.add_device("made", HW)  # registered; its token is not needed
    factory_cert, factory_key = tmp_path / "made.pem", tmp_path / "made.key"
    proxied.manufacturer.issue_to_files(
        serial="made", hardware_id=HW, cert_path=factory_cert, key_path=factory_key
    )
    # The factory certificate opens no device route, through nginx or not.
    for path in (TIMESTAMP, "/api/v1/device/whoami"):
        status, data = request(proxied, path, cert=factory_cert, key=factory_key)
        assert status == 403, path
        assert "the client certificate is not from the device CA" in reason(data)
    status, data = request(
        proxied,
        "/.well-known/est/simplereenroll",
        cert=factory_cert,
        key=factory_key,
        method="POST",
        body=b"",
    )
    assert status == 403
    assert "not from the device CA" in reason(data)
    dev = proxied.device("made", enroll=False)
    cert = dev.enroll_with_factory_certificate(
        factory_cert=factory_cert, factory_key=factory_key, key_store=FILE_KEY
    )
    status, data = request(
        proxied, "/api/v1/device/whoami", cert=dev.paths.device_cert, key=dev.paths.device_key
    )
    assert status == 200, data
    assert json.loads(data)["certificate_serial"] == format(cert.serial_number, "x")


def test_a_factory_certificate_from_an_untrusted_ca_is_refused_at_each_layer(
    proxied: Proxied, tmp_path: Path
) -> None:
    with proxied.fleet() as fleet:
        fleet.add_device("counterfeit", HW)
    rogue = ManufacturerCA.create(tmp_path / "rogue", name="Acme factory CA")  # same name
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "c.key"
    rogue.issue_to_files(
        serial="counterfeit", hardware_id=HW, cert_path=cert_path, key_path=key_path
    )
    body = base64.encodebytes(build_csr(ec.generate_private_key(ec.SECP256R1()), "counterfeit"))
    est = "/.well-known/est/simpleenroll"
    status, data = request(proxied, est, cert=cert_path, key=key_path, method="POST", body=body)
    assert status == 400  # nginx: the chain does not verify
    assert b"The SSL certificate error" in data
    # Forwarded as if a proxy had accepted it, the app refuses it by its own check.
    status, data = request(
        proxied,
        est,
        headers=forwarded(cert_path.read_bytes()),
        direct_from=PROXY,
        method="POST",
        body=body,
    )
    assert status == 403
    assert "is not from a trusted manufacturer CA" in reason(data)


def test_an_update_driven_by_the_director_through_nginx(proxied: Proxied) -> None:
    """Production topology: the check-in (with the director's instruction in its answer),
    metadata and image all pass nginx; the device installs what the director instructs."""
    dev = proxied.device("directed", director_root=proxied.world.director_root)
    proxied.world.release("1.9.0", security=True)
    result = dev.update()
    assert (result.outcome, result.to_version) == ("updated", "1.9.0")
    line = proxied.nginx.access_log_line("/api/v1/device/checkin", "CN=directed")
    assert 'client_verify="SUCCESS"' in line
