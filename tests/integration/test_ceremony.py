"""The offline k-of-n signing ceremony, with one targets key in a real SoftHSM2 token.

Acceptance (issue 8): a release signed 2-of-3 (one key in SoftHSM) publishes and a real
device installs it from a real HTTPS server; 1-of-3 is refused naming the missing
signers; a request whose bytes changed after staging is refused by ``sign`` and by
``publish``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import HW, PASSPHRASE, World
from hsm_support import SoftToken, start_softhsm
from otaguard.cli import passphrase_env_var
from otaguard.crypto import read_public_key
from otaguard.crypto.hsm import generate_hsm_key
from otaguard.model.errors import HybridPolicyError, OperatorError, VerificationError
from otaguard.repo import ImageRepository
from otaguard.repo.ceremony import SigningRequest, publish_request, sign_request, stage_release
from otaguard.repo.keyspec import ExternalKey, RoleKeySpec
from otaguard.server import ServerSettings, init_data_dir, start_server_in_thread
from sbom_support import sbom_beside

HSM_KEY = "targets-ecdsa-p256"
FILE_KEYS = ("targets-ed25519", "targets-ml-dsa-65")


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    return start_softhsm(tmp_path, monkeypatch)


def _secrets(token: SoftToken):  # type: ignore[no-untyped-def]
    """Passphrases of the file keys; the token's PIN for the HSM key."""
    return lambda name: token.pin.encode() if name == HSM_KEY else PASSPHRASE


@pytest.fixture
def world(tmp_path: Path, token: SoftToken) -> Iterator[World]:
    """Targets 2-of-3: Ed25519 and ML-DSA-65 in encrypted files, ECDSA P-256 in SoftHSM;
    the server signs snapshot and timestamp with an ECDSA P-384 key in the same token."""
    made = generate_hsm_key(
        token_label=token.label, pin=token.pin, algorithm="ecdsa-p256", key_label=HSM_KEY
    )
    # The server's online key (snapshot, timestamp) is in the token too.
    online = generate_hsm_key(
        token_label=token.label, pin=token.pin, algorithm="ecdsa-p384", key_label="online"
    )
    paths = init_data_dir(tmp_path / "server", online_key_uri=online.uri, hsm_pin=token.pin)
    assert read_public_key(paths.online_public_key).keyid == online.public_key.keyid
    repo = ImageRepository.init(
        tmp_path / "repo",
        keys_dir=tmp_path / "keys",
        passphrases=_secrets(token),
        online_key=read_public_key(paths.online_public_key),
        key_specs={"targets": RoleKeySpec(3, 2, (ExternalKey(made.uri, made.public_key),))},
    )
    server = start_server_in_thread(
        ServerSettings(
            data_dir=paths.data_dir, repo_dir=repo.dir, host="127.0.0.1", port=0,
            sync_interval=0.1, online_key_uri=online.uri, hsm_pin=token.pin,
        )
    )  # fmt: skip
    w = World(tmp_path, repo, server, {}, {})
    try:
        yield w
    finally:
        server.stop()


def _stage(w: World, version: str, **kw: object) -> Path:
    out = w.tmp / f"{version}.request.json"
    stage_release(
        w.repo, w.image(version), version=version, hardware_ids=[HW],
        sbom=sbom_beside(w.image(version)),
        security=bool(kw.get("security", False)), security_counter=None, out=out,
    )  # fmt: skip
    return out


def _sign(w: World, req: Path, key: str, token: SoftToken) -> None:
    request = SigningRequest.load(req)
    uri = (
        next(r.uri for r in w.repo.key_refs("targets") if r.name == HSM_KEY)
        if key == HSM_KEY
        else f"encfile:{w.keys_dir / key}.pem"
    )
    assert uri is not None
    sign_request(request, uri=uri, secrets=_secrets(token))
    request.save(req)


def test_root_lists_three_targets_keys_threshold_two(world: World) -> None:
    root = world.repo.latest_root()
    assert root.roles["targets"].threshold == 2 and len(root.roles["targets"].keyids) == 3
    names = [r.name for r in world.repo.key_refs("targets")]
    assert names == [*FILE_KEYS, HSM_KEY]
    report, _ = world.repo.verify()
    assert not report.all_problems()


def test_two_of_three_with_hsm_publishes_and_device_installs(
    world: World, token: SoftToken
) -> None:
    req = _stage(world, "1.0.0")
    _sign(world, req, "targets-ed25519", token)
    _sign(world, req, HSM_KEY, token)
    # Two classical signatures meet the threshold, not root's hybrid policy (ADR 0014).
    with pytest.raises(OperatorError, match="no valid ML-DSA signature") as refused:
        publish_request(world.repo, SigningRequest.load(req))
    assert isinstance(refused.value.__cause__, HybridPolicyError)
    _sign(world, req, "targets-ml-dsa-65", token)
    publish_request(world.repo, SigningRequest.load(req))
    world.wait_served()
    dev = world.device()
    assert dev.update().outcome == "up-to-date"

    # 1.1.0 by the CLI, as the people of the ceremony would run it: stage, two signers
    # (the ML-DSA file key and the token), publish; the server serves it, the device installs.
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(world.tmp),
        "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"], "PYKCS11LIB": token.module,
        passphrase_env_var("targets-ml-dsa-65"): PASSPHRASE.decode(),
        passphrase_env_var(HSM_KEY): token.pin,
    }  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "otaguard", *args], env=env, capture_output=True,
            text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    req2 = world.tmp / "1.1.0.request.json"
    staged = run(
        "release", "stage", str(world.repo.dir), str(world.image("1.1.0")),
        "--version", "1.1.0", "--hardware-id", HW, "--security", "--out", str(req2),
        "--sbom", str(sbom_beside(world.image("1.1.0"))),
    )  # fmt: skip
    assert staged.returncode == 0, staged.stderr
    assert "SECURITY" in staged.stdout and "signatures: 0 of 2 needed" in staged.stdout
    hsm_uri = next(r.uri for r in world.repo.key_refs("targets") if r.name == HSM_KEY)
    assert hsm_uri is not None
    no_yes = run("sign", str(req2), "--key", hsm_uri)
    assert no_yes.returncode == 2 and "pass --yes after reading the summary" in no_yes.stderr
    for uri in (f"encfile:{world.keys_dir / 'targets-ml-dsa-65.pem'}", hsm_uri):
        signed = run("sign", str(req2), "--key", uri, "--yes")
        assert signed.returncode == 0, signed.stderr
        assert "1.1.0" in signed.stdout  # the summary is shown before signing
    published = run("release", "publish", str(world.repo.dir), str(req2))
    assert published.returncode == 0, published.stderr
    assert "published targets version 3 (2 of 2 signatures)" in published.stdout
    world.wait_served()
    result = dev.update()
    assert result.outcome == "updated" and result.to_version == "1.1.0"
    assert dev.status().floor.security_counter == 1


def test_one_of_three_is_refused_naming_the_missing_signers(world: World, token: SoftToken) -> None:
    req = _stage(world, "1.0.0")
    _sign(world, req, HSM_KEY, token)
    before = world.repo.latest_version("targets")
    with pytest.raises(OperatorError) as e:
        publish_request(world.repo, SigningRequest.load(req))
    assert str(e.value) == (
        "targets needs 2 of 3 signatures, has 1 (targets-ecdsa-p256); "
        "missing signers: targets-ed25519, targets-ml-dsa-65"
    )
    assert world.repo.latest_version("targets") == before
    # The same signer twice is still one signature.
    with pytest.raises(OperatorError, match="already signed"):
        _sign(world, req, HSM_KEY, token)


def _tamper_bytes(req: Path) -> None:
    """Change the bytes to sign after staging (another image hash), keep the summary."""
    doc = json.loads(req.read_text())
    data = base64.b64decode(doc["signed"])
    staged_hash = doc["summary"]["images"][0]["sha256"]
    doc["signed"] = base64.b64encode(data.replace(staged_hash.encode(), b"e" * 64)).decode()
    req.write_text(json.dumps(doc))


def test_tampered_request_is_refused_by_sign_and_by_publish(world: World, token: SoftToken) -> None:
    req = _stage(world, "1.0.0")
    _sign(world, req, "targets-ed25519", token)
    _sign(world, req, "targets-ml-dsa-65", token)
    good = req.read_text()
    _tamper_bytes(req)
    with pytest.raises(VerificationError, match="summary does not match the bytes"):
        _sign(world, req, HSM_KEY, token)
    with pytest.raises(VerificationError, match="summary does not match the bytes"):
        publish_request(world.repo, SigningRequest.load(req))
    # Bytes and summary changed together: the signatures made over the staged bytes do
    # not verify over the new ones, so the request is refused as a whole.
    doc = json.loads(good)
    request = SigningRequest(doc)
    data = base64.b64decode(doc["signed"]).replace(
        request.summary["images"][0]["sha256"].encode(), b"e" * 64
    )
    doc["signed"] = base64.b64encode(data).decode()
    doc["summary"]["images"][0]["sha256"] = "e" * 64
    with pytest.raises(VerificationError, match="does not verify over its bytes"):
        SigningRequest(doc)
    assert world.repo.latest_version("targets") == 1
    # The untouched request still publishes.
    req.write_text(good)
    assert publish_request(world.repo, SigningRequest.load(req)).signed.version == 2


def test_request_staged_before_another_release_is_refused(world: World, token: SoftToken) -> None:
    old = _stage(world, "1.0.0")
    new = _stage(world, "1.0.1")
    for req in (old, new):
        _sign(world, req, "targets-ed25519", token)
        _sign(world, req, "targets-ml-dsa-65", token)
    publish_request(world.repo, SigningRequest.load(new))
    with pytest.raises(OperatorError, match="changed since this request was staged"):
        publish_request(world.repo, SigningRequest.load(old))


def test_hostile_request_file_is_one_line_error(world: World, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"otaguard_signing_request": 1, "role": "targets", "signed": 5}')
    r = subprocess.run(
        [sys.executable, "-m", "otaguard", "sign", str(bad), "--key", "encfile:x.pem", "--yes"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 3
    assert r.stderr.strip().splitlines() == [
        "verification failed: signing request: the bytes to sign is not base64 text"
    ]


def test_cli_kofn_init_key_list_and_serverless_ceremony(token: SoftToken, tmp_path: Path) -> None:
    """By hand, server-less: a token key, 2-of-3 targets, the ceremony, repo verify."""
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
        "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"], "PYKCS11LIB": token.module,
        "OTAGUARD_KEY_PASSPHRASE": PASSPHRASE.decode(),
        passphrase_env_var("targets-hsm"): token.pin,
        passphrase_env_var(HSM_KEY): token.pin,
    }  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "otaguard", *args], env=env, capture_output=True,
            text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    uri = f"hsm:1?label={token.label}"
    made = run("key", "generate", "--uri", f"hsm:?label={token.label}", "--name", "targets-hsm")
    assert made.returncode == 0, made.stderr
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    too_many = run("repo", "init", str(repo), "--keys-dir", str(keys), "--targets-keys", "3",
                   "--targets-threshold", "4", "--targets-key", uri)  # fmt: skip
    assert too_many.returncode == 2
    assert too_many.stderr.strip() == "error: threshold 4 is not between 1 and the 3 keys"
    init = run("repo", "init", str(repo), "--keys-dir", str(keys), "--targets-keys", "3",
               "--targets-threshold", "2", "--targets-key", uri)  # fmt: skip
    assert init.returncode == 0, init.stderr
    listed = run("key", "list", str(repo))
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert "targets (2 of 3)  ecdsa-p256" in rows[HSM_KEY]
    assert f"PKCS#11 token {token.label}, key id 1" in rows[HSM_KEY]
    assert f"encrypted file {keys / 'targets-ml-dsa-65.pem'}" in rows["targets-ml-dsa-65"]
    assert "root (2 of 2)" in rows["root-ed25519"]

    image = tmp_path / "fw.img"
    image.write_bytes(b"firmware 1.0.0" * 1000)
    req = tmp_path / "r.json"
    staged = run("release", "stage", str(repo), str(image), "--version", "1.0.0",
                 "--hardware-id", HW, "--out", str(req),
                 "--sbom", str(sbom_beside(image)))  # fmt: skip
    assert staged.returncode == 0, staged.stderr
    one = run("sign", str(req), "--key", uri, "--yes")
    assert one.returncode == 0, one.stderr
    refused = run("release", "publish", str(repo), str(req))
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("missing signers: targets-ed25519, targets-ml-dsa-65")
    # the token's ECDSA key and the ML-DSA key: targets is hybrid (ADR 0014)
    two = run("sign", str(req), "--key", f"encfile:{keys / 'targets-ml-dsa-65.pem'}", "--yes")
    assert two.returncode == 0, two.stderr
    published = run("release", "publish", str(repo), str(req))
    assert published.returncode == 0, published.stderr
    verified = run("repo", "verify", str(repo))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "fw-1.0.0.img" in run("release", "list", str(repo)).stdout
    listed = json.loads(run("release", "list", str(repo), "--json").stdout)
    assert [(r["target"], r["version"]) for r in listed] == [("fw-1.0.0.img", "1.0.0")]
    # root by the same ceremony, both root keys (server-less: no token involved)
    root_req = tmp_path / "root.json"
    staged_root = run("repo", "stage-root", str(repo), "--out", str(root_req))
    assert staged_root.returncode == 0, staged_root.stderr
    assert "root version 2 (replaces 1)" in staged_root.stdout
    for name in ("root-ed25519", "root-ml-dsa-65"):
        signed = run("sign", str(root_req), "--key", f"encfile:{keys / name}.pem", "--yes")
        assert signed.returncode == 0, signed.stderr
    published_root = run("release", "publish", str(repo), str(root_req))
    assert published_root.returncode == 0, published_root.stderr
    assert "published root version 2 (2 of 2 signatures)" in published_root.stdout
    verified = run("repo", "verify", str(repo))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_signatures_count_by_the_repository_root_not_the_request_key_list(
    world: World, token: SoftToken
) -> None:
    """A request whose key list pairs the root's key ids with an attacker's keys (and
    signatures by them) is internally consistent, but publish counts by root's keys."""
    from securesystemslib.signer import CryptoSigner

    req = _stage(world, "1.0.0")
    doc = json.loads(req.read_text())
    signed = base64.b64decode(doc["signed"])
    for entry in doc["keys"][:2]:
        forged = CryptoSigner.generate_ed25519()
        entry["public"] = forged.public_key.to_dict()
        sig = forged.sign(signed)
        doc["signatures"].append({"keyid": entry["keyid"], "sig": sig.signature})
    request = SigningRequest(doc)  # consistent in itself
    with pytest.raises(OperatorError, match=r"has 0 \(none\); missing signers: targets-ed25519"):
        publish_request(world.repo, request)
    assert world.repo.latest_version("targets") == 1


@pytest.mark.parametrize(
    "signed",
    [
        b'{"_type":"targets","expires":"2030-01-01T00:00:00Z","spec_version":"1.0.31",'
        b'"targets":{},"version":2,"x":1.5}',  # a float: no canonical form
        b'{"_type":"targets","version":2}',  # fields missing
        b"\xff\xfe not json",
        b'{"_type": "targets", "expires": "2030-01-01T00:00:00Z", "spec_version": "1.0.31", '
        b'"targets": {}, "version": 2}',  # not canonical (spaces)
    ],
)
def test_request_bytes_that_are_not_canonical_targets_are_refused(signed: bytes) -> None:
    doc = {
        "otaguard_signing_request": 1,
        "role": "targets",
        "signed": base64.b64encode(signed).decode(),
        "base": base64.b64encode(signed).decode(),
    }
    with pytest.raises(VerificationError, match=r"the bytes to sign (is not|are not canonical)"):
        SigningRequest(doc)


def test_request_that_expired_before_publishing_is_refused(world: World, token: SoftToken) -> None:
    import datetime as dt

    req = _stage(world, "1.0.0")
    _sign(world, req, "targets-ed25519", token)
    _sign(world, req, "targets-ml-dsa-65", token)
    late = dt.datetime.now(dt.UTC) + dt.timedelta(days=91)  # targets live 90 days
    with pytest.raises(OperatorError, match="staged targets metadata has expired"):
        publish_request(world.repo, SigningRequest.load(req), now=late)
    assert world.repo.latest_version("targets") == 1


def test_root_ceremony_needs_both_root_keys_and_devices_follow(
    world: World, token: SoftToken
) -> None:
    """A new root by the ceremony: one root key is refused naming the other; both publish,
    and a device provisioned with root 1 follows to root 2 and installs a release signed
    after it (the targets request is staged against root 2)."""
    from otaguard.repo.ceremony import stage_root

    first = _stage(world, "1.0.0")
    _sign(world, first, "targets-ed25519", token)
    _sign(world, first, "targets-ml-dsa-65", token)
    publish_request(world.repo, SigningRequest.load(first))
    world.wait_served()
    dev = world.device()

    req = world.tmp / "root-2.request.json"
    staged = stage_root(world.repo, out=req, expiry_days=400)
    assert staged.summary["version"] == 2 and "root: 2 of 2 (root-ed25519, root-ml-dsa-65)" in (
        "\n".join(staged.render())
    )
    signing = SigningRequest.load(req)
    sign_request(signing, uri=f"encfile:{world.keys_dir / 'root-ed25519.pem'}",
                 secrets=_secrets(token))  # fmt: skip
    signing.save(req)
    with pytest.raises(OperatorError) as e:
        publish_request(world.repo, SigningRequest.load(req))
    assert str(e.value) == (
        "root 1 (current) needs 2 of 2 signatures, has 1 (root-ed25519); "
        "missing signers: root-ml-dsa-65"
    )
    signing = SigningRequest.load(req)
    sign_request(signing, uri=f"encfile:{world.keys_dir / 'root-ml-dsa-65.pem'}",
                 secrets=_secrets(token))  # fmt: skip
    signing.save(req)
    publish_request(world.repo, SigningRequest.load(req))
    assert world.repo.latest_version("root") == 2
    report, _ = world.repo.verify()
    assert not report.all_problems()

    second = _stage(world, "1.1.0")
    assert SigningRequest.load(second).root_version == 2
    _sign(world, second, "targets-ml-dsa-65", token)
    _sign(world, second, HSM_KEY, token)
    publish_request(world.repo, SigningRequest.load(second))
    world.wait_served()
    result = dev.update()
    assert result.outcome == "updated" and result.to_version == "1.1.0"
    assert (
        json.loads((dev.paths.root / "metadata" / "root.json").read_bytes())["signed"]["version"]
        == 2
    )


@pytest.mark.parametrize("role", [["targets"], {"r": 1}, 5, "snapshot"])
def test_request_for_an_unknown_role_is_refused(role: object) -> None:
    with pytest.raises(VerificationError, match="only targets or root"):
        SigningRequest({"otaguard_signing_request": 1, "role": role})
