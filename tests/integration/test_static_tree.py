"""The static topology (ADR 0016) with a real nginx: otaguard keeps the published
repository as a static tree (--static-tree), nginx serves it after asking otaguard
whether the device may read (auth_request), and proxies the dynamic API.

A device updates through it; a quarantined device is refused by nginx (within the
answer cache's 2 s); a tampered file in the tree is refused by the device (mirrors are
untrusted).
"""

from __future__ import annotations

import http.client
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import HW, SIM_HEALTH_COMMAND, World, start_world
from nginx_support import STATIC_TEMPLATE, Nginx, start_nginx
from otaguard.agent import Device
from otaguard.crypto import CertificateAuthority
from otaguard.model.errors import OtaguardError
from otaguard.server.client import FleetClient

PROXY = "127.0.0.2"  # nginx's source address, the only trusted proxy
TIMESTAMP = "/metadata/timestamp.json"
#: nginx keeps otaguard's "yes" this long (deploy/nginx/otaguard-static.conf)
AUTH_CACHE_SECONDS = 2.0


@dataclass
class Static:
    world: World
    nginx: Nginx
    tree: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.nginx.port}"

    def device(self, serial: str) -> Device:
        assert self.world.server.ca_cert is not None
        dev = Device.provision(
            self.world.tmp / serial,
            server_url=self.url,
            root_json=self.world.repo.metadata_dir / "root.json",
            ca_pem=self.world.server.ca_cert,
            hardware_id=HW,
            serial=serial,
            factory_image=self.world.image("1.0.0"),
            factory_version="1.0.0",
            health_command=SIM_HEALTH_COMMAND,
        )
        self.world.enroll(dev)  # EST through nginx
        dev.checkin()
        return dev

    def get(self, dev: Device, path: str) -> int:
        assert self.world.server.ca_cert is not None
        ctx = ssl.create_default_context(cafile=str(self.world.server.ca_cert))
        ctx.load_cert_chain(str(dev.paths.device_cert), str(dev.paths.device_key))
        conn = http.client.HTTPSConnection("127.0.0.1", self.nginx.port, context=ctx, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def wait_exported(self) -> None:
        """Until the tree's timestamp is the one otaguard serves."""
        store = self.world.server.app.state.store
        deadline = time.monotonic() + 10
        while True:
            current = store.current_timestamp()
            path = self.tree / "metadata" / "timestamp.json"
            if current is not None and path.exists() and path.read_bytes() == current.data:
                return
            assert time.monotonic() < deadline, "the static tree was not updated"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def static(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Static]:
    tmp = tmp_path_factory.mktemp("static")
    tree = tmp / "static-tree"
    world = start_world(tmp, trusted_proxies=(PROXY,), static_tree=tree)
    nginx = None
    try:
        world.release("1.0.0")
        data = world.server.data_dir
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
                "CLIENT_CA": str(data / "device-ca" / "chain.pem"),
                "UPSTREAM": urlsplit(world.server.base_url).netloc,
                "UPSTREAM_CA": str(world.server.ca_cert),
                "UPSTREAM_NAME": "localhost",
                "PROXY_ADDRESS": PROXY,
                "STATIC_TREE": str(tree),
                "AUTH_CACHE": str(tmp / "auth-cache"),
            },
            STATIC_TEMPLATE,
        )
        s = Static(world, nginx, tree)
        s.wait_exported()
        yield s
    finally:
        if nginx is not None:
            nginx.stop()
        world.server.stop()


def test_the_tree_holds_the_exact_signed_bytes_under_consistent_snapshot_names(
    static: Static,
) -> None:
    store = static.world.server.app.state.store
    meta = static.tree / "metadata"
    current = store.current_timestamp()
    assert (meta / "timestamp.json").read_bytes() == current.data
    root = store.newest("root")
    assert (meta / root.filename).read_bytes() == root.data
    assert (meta / "root.json").read_bytes() == root.data
    rel = static.world.releases["1.0.0"]
    blob = static.tree / "targets" / f"{rel.sha256}.{rel.path}"
    stored = static.world.server.data_dir / "blobs" / blob.name
    # a hard link into the blob store: no copy of the image
    assert os.stat(blob).st_ino == os.stat(stored).st_ino


def test_a_device_updates_from_the_static_tree_through_nginx(static: Static) -> None:
    dev = static.device("st1")
    static.world.release("1.1.0")
    static.wait_exported()
    result = dev.update()
    assert result.outcome == "updated" and result.to_version == "1.1.0", result
    rel = static.world.releases["1.1.0"]
    line = static.nginx.access_log_line(f"/targets/{rel.sha256}.{rel.path}", "CN=st1")
    assert 'client_verify="SUCCESS"' in line


def test_a_quarantined_device_is_refused_by_nginx(static: Static) -> None:
    dev = static.device("st2")
    assert static.get(dev, TIMESTAMP) == 200
    with FleetClient(
        server_url=static.world.server.base_url,
        ca_cert=static.world.server.ca_cert,
        token=static.world.server.operator_token,
    ) as fleet:
        fleet.quarantine("st2", "odd traffic")
    quarantined = time.monotonic()
    while static.get(dev, TIMESTAMP) != 403:
        # nginx keeps otaguard's last "yes" for at most AUTH_CACHE_SECONDS
        assert time.monotonic() - quarantined < AUTH_CACHE_SECONDS + 1.5, "still served"
        time.sleep(0.1)
    assert static.get(dev, "/targets/" + "0" * 64 + ".x.img") == 403
    assert static.nginx.access_log_line(TIMESTAMP, "CN=st2", '" 403 ')


def test_a_tampered_file_in_the_tree_is_refused_by_the_device(static: Static) -> None:
    dev = static.device("st3")  # runs 1.0.0; the newest release is 1.1.0 or later
    static.wait_exported()
    newest = max(static.world.releases.values(), key=lambda r: r.info.version)
    blob = static.tree / "targets" / f"{newest.sha256}.{newest.path}"
    original = blob.read_bytes()
    evil = bytes(b ^ 0xFF for b in original[:4096]) + original[4096:]
    # The mirror's copy is replaced (a new file: the blob store's link is untouched).
    tmp = blob.with_name(".evil")
    tmp.write_bytes(evil)
    os.replace(tmp, blob)
    try:
        with pytest.raises(OtaguardError, match=r"(?i)hash|length|mismatch"):
            dev.update()
    finally:
        stored = static.world.server.data_dir / "blobs" / blob.name
        os.link(stored, tmp)
        os.replace(tmp, blob)
    assert dev.update().outcome == "updated"  # the honest tree again
