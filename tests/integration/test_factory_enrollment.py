"""Factory-certificate enrollment, by direct mutual TLS: the rules of ADR 0005.

A manufacturer CA the server trusts (``--manufacturer-ca``) issues factory certificates; a
registered device enrolls with one in place of a token (EST simpleenroll authenticated by
the TLS client certificate). A factory certificate is never a device identity.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import logging
import os
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import HW, World, error_lines, start_world
from otaguard.agent import Device
from otaguard.agent.identity import build_csr
from otaguard.cli import main
from otaguard.crypto.manufacturer import ManufacturerCA
from otaguard.model.errors import AccessDeniedError, TransportError, VerificationError
from otaguard.model.unsafe import Unsafe
from otaguard.server.client import FleetClient
from otaguard.sim import SIM_HEALTH_COMMAND

FILE_KEY = Unsafe.FILE_DEVICE_KEY
TIMESTAMP = "/metadata/timestamp.json"
EST = "/.well-known/est/simpleenroll"


@dataclass
class Factory:
    world: World
    manufacturer: ManufacturerCA
    lookalike: ManufacturerCA
    skew: list[dt.timedelta]

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

    def register(self, serial: str, hardware_id: str = HW) -> None:
        with self.fleet() as fleet:
            fleet.add_device(serial, hardware_id)  # the token is not used

    def factory_identity(
        self,
        serial: str,
        *,
        hardware_id: str = HW,
        ca: ManufacturerCA | None = None,
        lifetime: dt.timedelta = dt.timedelta(days=3650),
    ) -> tuple[Path, Path]:
        cert, key = (
            self.world.tmp / f"{serial}-factory.pem",
            self.world.tmp / f"{serial}-factory.key",
        )
        (ca or self.manufacturer).issue_to_files(
            serial=serial, hardware_id=hardware_id, cert_path=cert, key_path=key,
            lifetime=lifetime,
        )  # fmt: skip
        return cert, key

    def device(self, serial: str) -> Device:
        return Device.provision(
            self.world.tmp / serial,
            server_url=self.world.server.base_url,
            root_json=self.world.repo.metadata_dir / "root.json",
            ca_pem=self.ca,
            hardware_id=HW,
            serial=serial,
            factory_image=self.world.image("1.0.0"),
            factory_version="1.0.0",
            health_command=SIM_HEALTH_COMMAND,
        )


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Factory]:
    tmp = tmp_path_factory.mktemp("factory")
    manufacturer = ManufacturerCA.create(tmp / "manufacturer", name="Acme factory CA")
    # A second trusted manufacturer that names itself exactly like the device issuing CA.
    lookalike = ManufacturerCA.create(tmp / "lookalike", name="otaguard device issuing CA")
    bundle = tmp / "manufacturers.pem"
    bundle.write_bytes(manufacturer.cert_path.read_bytes() + lookalike.cert_path.read_bytes())
    skew = [dt.timedelta(0)]
    world = start_world(
        tmp / "w",
        clock=lambda: dt.datetime.now(dt.UTC) + skew[0],
        manufacturer_ca=bundle,
        trusted_proxies=("127.0.0.2",),
    )
    try:
        world.release("1.0.0")
        yield Factory(world, manufacturer, lookalike, skew)
    finally:
        world.server.stop()


@pytest.fixture(autouse=True)
def _clock_reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "factory" in request.fixturenames:
        request.getfixturevalue("factory").skew[0] = dt.timedelta(0)


def get(
    f: Factory, path: str, cert: Path, key: Path, *, method: str = "GET", body: bytes = b""
) -> tuple[int, str]:
    url = urlsplit(f.world.server.base_url)
    ctx = ssl.create_default_context(cafile=str(f.ca))
    ctx.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body or None)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, str(json.loads(data)["error"]) if resp.status != 200 else ""


def test_a_registered_device_enrolls_with_its_factory_certificate_and_updates(
    factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    factory.register("f-good")
    fcert, fkey = factory.factory_identity("f-good")
    dev = factory.device("f-good")
    with caplog.at_level(logging.INFO, logger="otaguard"):
        cert = dev.enroll_with_factory_certificate(
            factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
        )
    assert any(
        "f-good enrolled with its factory certificate" in r.getMessage() for r in caplog.records
    )
    # The device certificate comes from the device CA; its key is new, not the factory key.
    factory_cert = x509.load_pem_x509_certificate(fcert.read_bytes())
    assert cert.issuer.rfc4514_string() == "CN=otaguard device issuing CA"
    assert cert.public_key() != factory_cert.public_key()
    with factory.fleet() as fleet:
        info = fleet.show("f-good")
    assert info.status == "enrolled" and info.cert_serials == (format(cert.serial_number, "x"),)
    assert dev.update().outcome == "up-to-date"


def test_a_factory_certificate_is_never_a_device_identity(factory: Factory) -> None:
    factory.register("f-ident")
    fcert, fkey = factory.factory_identity("f-ident")
    for path in (TIMESTAMP, "/targets/" + "0" * 64 + ".fw.img", "/api/v1/device/whoami"):
        status, why = get(factory, path, fcert, fkey)
        assert status == 403, path
        assert why == "access denied: the client certificate is not from the device CA", path
    status, why = get(factory, "/.well-known/est/simplereenroll", fcert, fkey, method="POST")
    assert status == 403
    assert "not from the device CA" in why
    # A trusted manufacturer named like the device issuing CA: the name matches, the
    # signature does not.
    lcert, lkey = factory.factory_identity("f-ident", ca=factory.lookalike)
    assert x509.load_pem_x509_certificate(lcert.read_bytes()).issuer.rfc4514_string() == (
        "CN=otaguard device issuing CA"
    )
    for path in (TIMESTAMP, "/api/v1/device/whoami"):
        status, why = get(factory, path, lcert, lkey)
        assert status == 403
        assert "signature does not verify against the device CA" in why
    status, why = get(factory, "/.well-known/est/simplereenroll", lcert, lkey, method="POST")
    assert status == 403
    assert "signature does not verify against the device CA" in why


def test_a_factory_certificate_from_an_untrusted_ca_fails_the_handshake(
    factory: Factory, tmp_path: Path
) -> None:
    factory.register("f-rogue")
    rogue = ManufacturerCA.create(tmp_path / "rogue", name="Acme factory CA")
    fcert, fkey = factory.factory_identity("f-rogue", ca=rogue)
    dev = factory.device("f-rogue")
    with pytest.raises(TransportError, match=r"enrollment request to .* failed|TLS with"):
        dev.enroll_with_factory_certificate(
            factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
        )
    assert not dev.paths.device_cert.exists()


def test_a_factory_certificate_for_another_serial_is_refused(factory: Factory) -> None:
    factory.register("f-mine")
    factory.register("f-other")
    fcert, fkey = factory.factory_identity("f-other")
    dev = factory.device("f-mine")
    with pytest.raises(
        VerificationError, match=r"CSR subject CN 'f-mine' is not the device serial 'f-other'"
    ):
        dev.enroll_with_factory_certificate(
            factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
        )
    with factory.fleet() as fleet:
        assert fleet.show("f-other").cert_serials == ()
    # Its hardware id is bound too.
    factory.register("f-hw", hardware_id="other-hw")
    fcert, fkey = factory.factory_identity("f-hw")
    with pytest.raises(
        AccessDeniedError, match=r"names hardware id test-hw, the registry other-hw"
    ):
        factory.device("f-hw").enroll_with_factory_certificate(
            factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
        )


def test_an_expired_factory_certificate_is_refused(
    factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    factory.register("f-old")
    fcert, fkey = factory.factory_identity("f-old", lifetime=dt.timedelta(hours=1))
    factory.skew[0] = dt.timedelta(hours=2)  # the server's clock; TLS still accepts it
    with (
        caplog.at_level(logging.WARNING, logger="otaguard"),
        pytest.raises(
            AccessDeniedError,
            match=r"factory enrollment refused: the factory certificate expired at",
        ),
    ):
        factory.device("f-old").enroll_with_factory_certificate(
            factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
        )
    assert any(
        "factory certificate expired at" in r.getMessage() and "CN=f-old" in r.getMessage()
        for r in caplog.records
    )


def test_unknown_revoked_and_quarantined_devices_are_refused(factory: Factory) -> None:
    fcert, fkey = factory.factory_identity("f-unknown")
    with pytest.raises(AccessDeniedError, match=r"device f-unknown is not in the registry"):
        factory.device("f-unknown").enroll_with_factory_certificate(
            factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
        )
    with factory.fleet() as fleet:
        assert all(d.serial != "f-unknown" for d in fleet.list_devices())  # not auto-registered
    for serial, action in (("f-revoked", "revoke"), ("f-quarantined", "quarantine")):
        factory.register(serial)
        with factory.fleet() as fleet:
            getattr(fleet, action)(serial, "lost in transit")
        fcert, fkey = factory.factory_identity(serial)
        with pytest.raises(
            AccessDeniedError, match=rf"device {serial} is {action}d: lost in transit"
        ):
            factory.device(serial).enroll_with_factory_certificate(
                factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
            )


def test_factory_re_enrollment_only_after_the_device_certificate_expired(factory: Factory) -> None:
    factory.register("f-again")
    fcert, fkey = factory.factory_identity("f-again")
    dev = factory.device("f-again")
    first = dev.enroll_with_factory_certificate(
        factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
    )
    # While it holds a valid certificate, a second factory enrollment (a clone?) is refused.
    with pytest.raises(
        AccessDeniedError, match=r"holds a certificate valid until .*simplereenroll"
    ):
        dev.enroll_with_factory_certificate(
            factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
        )
    factory.skew[0] = dt.timedelta(hours=25)
    second = dev.enroll_with_factory_certificate(
        factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY
    )
    assert second.serial_number != first.serial_number


def test_without_a_token_or_certificate_enrollment_asks_for_one(factory: Factory) -> None:
    url = urlsplit(factory.world.server.base_url)
    ctx = ssl.create_default_context(cafile=str(factory.ca))
    conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=10)
    body = base64.encodebytes(build_csr(ec.generate_private_key(ec.SECP256R1()), "nobody"))
    try:
        conn.request("POST", EST, body=body)
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
    finally:
        conn.close()
    assert status == 401
    assert "HTTP Basic serial:token or a factory certificate" in json.loads(data)["error"]


def test_the_manufacturer_and_device_commands(
    factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mdir = tmp_path / "acme"
    assert main(["manufacturer", "init", str(mdir)]) == 0
    out = capsys.readouterr()
    assert "INSECURE" in out.err and "HSM" in out.err
    assert stat.S_IMODE(os.stat(mdir / "ca.key").st_mode) == 0o600
    assert main(["manufacturer", "init", str(mdir)]) == 2  # never overwrites a CA
    assert "already exists" in capsys.readouterr().err
    prefix = tmp_path / "f-cli"
    args = ["manufacturer", "issue", str(mdir), "--serial", "f-cli", "--hardware-id", HW]
    assert main([*args, "--out", str(prefix)]) == 0
    assert "INSECURE" in capsys.readouterr().err
    assert stat.S_IMODE(os.stat(f"{prefix}.key").st_mode) == 0o600
    # This server trusts another manufacturer: the handshake fails, one line, exit 4.
    factory.register("f-cli")
    dev = factory.device("f-cli")
    enroll = ["device", "enroll", str(dev.paths.root), "--factory-cert", f"{prefix}.pem"]
    assert main([*enroll, "--factory-key", f"{prefix}.key"]) == 4
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "INSECURE" not in ln]
    assert len(errors) == 1 and "Traceback" not in errors[0]
    fcert, fkey = factory.factory_identity("f-cli")
    enroll = ["device", "enroll", str(dev.paths.root), "--factory-cert", str(fcert)]
    assert main([*enroll, "--factory-key", str(fkey)]) == 0
    assert "enrolled device f-cli with its factory certificate" in capsys.readouterr().out
    assert main([*enroll, "--factory-key", str(fkey), "--token", "x"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["device", "enroll", str(dev.paths.root), "--factory-cert", str(fcert)]) == 2
    assert "--factory-key" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "bad"), "--serial", "no spaces"]) == 2
    assert "invalid device serial" in capsys.readouterr().err


def test_the_factory_key_is_not_the_device_key(factory: Factory) -> None:
    factory.register("f-keys")
    fcert, fkey = factory.factory_identity("f-keys")
    dev = factory.device("f-keys")
    dev.enroll_with_factory_certificate(factory_cert=fcert, factory_key=fkey, key_store=FILE_KEY)
    device_key = serialization.load_pem_private_key(dev.paths.device_key.read_bytes(), None)
    factory_key = serialization.load_pem_private_key(fkey.read_bytes(), None)
    assert device_key.public_key() != factory_key.public_key()


def test_server_options_refuse_bad_values_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ["server", "--data", str(tmp_path / "srv"), "--port", "0"]
    assert main([*data, "--trusted-proxy", "nginx.local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: trusted proxy 'nginx.local' is not an IP address or CIDR network: "
        "'nginx.local' does not appear to be an IPv4 or IPv6 network"
    ]
    assert main([*data, "--trusted-proxy", "127.0.0.1", "--trusted-proxy", "::/0"]) == 2
    assert "trusted proxy '::/0' would trust every address" in capsys.readouterr().err
    monkeypatch.setenv("OTAGUARD_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/33")
    assert main(data) == 2
    assert "trusted proxy '10.0.0.0/33'" in capsys.readouterr().err
    monkeypatch.delenv("OTAGUARD_TRUSTED_PROXIES")
    (tmp_path / "not-a-ca.pem").write_text("hello")
    assert main([*data, "--manufacturer-ca", str(tmp_path / "not-a-ca.pem")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "holds no PEM certificate" in err[0], err
