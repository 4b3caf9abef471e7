"""A hostile or broken server answering the simulated fleet's check-ins.

The devices enroll with the real server, then talk to a hostile TLS server (a real
socket, a certificate from a CA the test makes) that answers the check-in with garbage:
every answer is one counted error of the expected kind, with its cause, and the
simulator itself never raises or hangs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import HW, World, start_world
from otaguard.sim.fleetsim import FleetSim, SimSettings


def _tls_pair(tmp: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA, and a certificate for 127.0.0.1 it issued (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = tmp / "hostile-ca.pem", tmp / "hostile-cert.pem", tmp / "hostile-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _http(status: int, body: bytes, *, extra: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n".encode()
    return head + extra + b"\r\n" + body


NONCE_OK = _http(200, json.dumps({"nonce": "n" * 43, "attestation_key_registered": False}).encode())


class Hostile:
    """A TLS server on 127.0.0.1 answering nonce and check-in with the test's bytes.

    ``answers`` maps a path to raw response bytes; ``None`` means: never answer. After
    answering a path in ``close_after`` the server hangs up.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.answers: dict[str, bytes | None] = {}
        self.close_after: set[str] = set()
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                answer = self.answers.get(path, _http(404, b'{"error": "none"}'))
                if answer is None:
                    await asyncio.sleep(3600)
                    return
                writer.write(answer)
                await writer.drain()
                if path in self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def enrolled(tmp_path: Path) -> Iterator[tuple[FleetSim, Hostile]]:
    """Four devices enrolled with a real director server, then pointed at a hostile one."""
    w: World = start_world(tmp_path, director=True)
    try:
        w.release("1.0.0")
        assert w.server.ca_cert is not None and w.director_root is not None
        settings = SimSettings(
            server_url=w.server.base_url,
            ca_cert=w.server.ca_cert,
            trusted_root=(w.repo.metadata_dir / "root.json").read_bytes(),
            director_root=w.director_root.read_bytes(),
            hardware_id=HW,
            devices=4,
            identity_dir=tmp_path / "ids",
            # enrolling against the real server may take seconds on a loaded machine; the
            # hostile answers below get the short timeout
            timeout=30.0,
        )
        sim = FleetSim(settings)
        asyncio.run(sim.enroll(operator_token=w.server.operator_token))
    finally:
        w.server.stop()
    ca, cert, key = _tls_pair(tmp_path)
    hostile = Hostile(cert, key)
    # short, for the answer that never comes; not 1 s: the TLS handshake alone took longer
    # than that on a machine loaded to 10 on 2 cores
    sim.settings = dataclasses.replace(
        settings, server_url=f"https://127.0.0.1:{hostile.port}", ca_cert=ca, timeout=4.0
    )
    try:
        yield sim, hostile
    finally:
        hostile.stop()


CHECKIN = "/api/v1/device/checkin"
NONCE = "/api/v1/device/nonce"


@pytest.mark.parametrize(
    ("answers", "kind", "cause"),
    [
        ({NONCE: _http(200, b"<html>")}, "VerificationError", "answer is not JSON"),
        ({NONCE: _http(200, b"[1, 2]")}, "VerificationError", "not a JSON object"),
        ({NONCE: _http(200, b'{"nonce": 7}')}, "VerificationError", "nonce answer is malformed"),
        ({NONCE: _http(200, b"x" * 40_000)}, "TransportError", "exceeds 32768"),
        ({NONCE: b"SMTP ready\r\n\r\n"}, "TransportError", "not HTTP/1.1"),
        ({NONCE: b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 100 + b"\r\n"}, "TransportError",
         "more than 64 header lines"),
        ({NONCE: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"}, "TransportError",
         "chunked"),
        ({NONCE: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "close": b""},
         "TransportError", "IncompleteReadError"),
        ({NONCE: None}, "TransportError", "TimeoutError"),
        ({NONCE: _http(403, b'{"error": "go away"}')}, "AccessDeniedError", "go away"),
        ({NONCE: NONCE_OK, CHECKIN: _http(200, json.dumps({
            "serial": "someone-else", "time": "t", "attested": False, "boot_sha256": "0" * 64,
            "director_targets": None}).encode())}, "VerificationError", "accepted serial"),
        ({NONCE: NONCE_OK, CHECKIN: _http(200, json.dumps({
            "serial": "x", "director_targets": 5}).encode())}, "VerificationError",
         "director instruction is malformed"),
    ],
)  # fmt: skip
def test_hostile_answers_are_counted_not_raised(
    enrolled: tuple[FleetSim, Hostile], answers: dict[str, bytes | None], kind: str, cause: str
) -> None:
    sim, hostile = enrolled
    if answers.pop("close", None) is not None:
        hostile.close_after.add(NONCE)
    hostile.answers.update(answers)
    stats = asyncio.run(asyncio.wait_for(sim.run(cycles=2), 30))
    assert stats.errors == {kind: 8}, stats.error_examples
    assert cause in stats.error_examples[kind]
    assert stats.checkins == 0 and stats.running == {"1.0.0": 4}


def test_hostile_director_bytes_are_refused_and_flagged(enrolled: tuple[FleetSim, Hostile]) -> None:
    """An accepted check-in whose director instruction is garbage: refused as director
    metadata, remembered as an attack flag for the next manifest."""
    sim, hostile = enrolled
    accepted = {"serial": "", "time": "t", "attested": False, "boot_sha256": "0" * 64,
                "director_targets": "not metadata"}  # fmt: skip
    dev = sim.devices[0]
    hostile.answers.update(
        {
            NONCE: NONCE_OK,
            CHECKIN: _http(200, json.dumps({**accepted, "serial": dev.serial}).encode()),
        }
    )
    sim.devices = [dev]
    stats = asyncio.run(asyncio.wait_for(sim.run(cycles=1), 30))
    # The hostile server has no director root 2 (404): root 1 stands; then the garbage.
    assert stats.checkins == 1
    assert list(stats.errors) == ["DirectorMetadataError"], stats.error_examples
    assert dev.attack_flags == {"director-metadata-invalid"}
