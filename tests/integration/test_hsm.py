"""Keys in a real SoftHSM2 token through hsm: URIs (no mock of PKCS#11 anywhere)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from securesystemslib.signer import SSlibKey
from tuf.api.metadata import Metadata, Targets

from hsm_support import SoftToken, start_softhsm
from otaguard.cli import passphrase_env_var
from otaguard.crypto.hsm import generate_hsm_key, hsm_public_key, list_hsm_keys
from otaguard.crypto.signers import load_signer
from otaguard.model.errors import ConfigError, KeyAccessError, OperatorError


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SoftToken:
    return start_softhsm(tmp_path, monkeypatch)


def _pin(tok: SoftToken):  # type: ignore[no-untyped-def]
    return lambda _name: tok.pin.encode()


@pytest.mark.parametrize(
    ("algorithm", "scheme"),
    [("ecdsa-p256", "ecdsa-sha2-nistp256"), ("ecdsa-p384", "ecdsa-sha2-nistp384")],
)
def test_key_made_in_token_signs_tuf_metadata(
    token: SoftToken, algorithm: str, scheme: str
) -> None:
    made = generate_hsm_key(
        token_label=token.label, pin=token.pin, algorithm=algorithm, key_label="targets-hsm"
    )
    assert made.uri == f"hsm:1?label={token.label}"
    assert made.public_key.scheme == scheme
    # The public half is readable without the PIN, and is the same key.
    assert hsm_public_key(made.uri).keyid == made.public_key.keyid
    signer = load_signer(made.uri, made.public_key, name="targets-hsm", secrets=_pin(token))
    md = Metadata(Targets())
    md.sign(signer)
    made.public_key.verify_signature(md.signatures[made.public_key.keyid], md.signed_bytes)
    assert [k.uri for k in list_hsm_keys(token.label)] == [made.uri]


def test_private_key_never_leaves_the_token(token: SoftToken) -> None:
    """CKA_SENSITIVE and not extractable: the token refuses to export it (pkcs11-tool)."""
    generate_hsm_key(token_label=token.label, pin=token.pin, algorithm="ecdsa-p256", key_label="k")
    import pkcs11

    lib = pkcs11.lib(token.module)
    with lib.get_token(token_label=token.label).open(user_pin=token.pin) as session:
        (priv,) = session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY})
        assert priv[pkcs11.Attribute.SENSITIVE] is True
        assert priv[pkcs11.Attribute.EXTRACTABLE] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            priv[pkcs11.Attribute.VALUE]


def test_wrong_pin_fails_when_loading_not_when_signing(token: SoftToken) -> None:
    made = generate_hsm_key(
        token_label=token.label, pin=token.pin, algorithm="ecdsa-p256", key_label="k"
    )
    with pytest.raises(KeyAccessError, match=f"wrong PIN for token {token.label}"):
        load_signer(made.uri, made.public_key, name="k", secrets=lambda _n: b"0000-wrong")
    with pytest.raises(KeyAccessError, match="its PIN is needed"):
        load_signer(made.uri, made.public_key, name="k", secrets=None)


def test_token_key_that_is_not_the_listed_key_is_refused(token: SoftToken) -> None:
    a = generate_hsm_key(
        token_label=token.label, pin=token.pin, algorithm="ecdsa-p256", key_label="a"
    )
    b = generate_hsm_key(
        token_label=token.label, pin=token.pin, algorithm="ecdsa-p256", key_label="b"
    )
    assert (a.uri, b.uri) == (f"hsm:1?label={token.label}", f"hsm:2?label={token.label}")
    with pytest.raises(ConfigError, match="holds another key than the metadata lists"):
        load_signer(a.uri, b.public_key, name="a", secrets=_pin(token))


def test_existing_key_id_is_never_overwritten_and_mldsa_stays_in_files(token: SoftToken) -> None:
    generate_hsm_key(
        token_label=token.label, pin=token.pin, algorithm="ecdsa-p256", key_label="a", key_id=5
    )
    with pytest.raises(OperatorError, match="already holds a key with id 5"):
        generate_hsm_key(
            token_label=token.label, pin=token.pin, algorithm="ecdsa-p384", key_label="b", key_id=5
        )
    with pytest.raises(OperatorError, match="ml-dsa-65 keys stay in encrypted files"):
        generate_hsm_key(
            token_label=token.label, pin=token.pin, algorithm="ml-dsa-65", key_label="c"
        )


def test_unknown_token_and_missing_module_are_config_errors(
    token: SoftToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="no PKCS#11 token labelled 'nope'"):
        hsm_public_key("hsm:1?label=nope")
    monkeypatch.delenv("PYKCS11LIB")
    with pytest.raises(ConfigError, match="set PYKCS11LIB"):
        hsm_public_key(f"hsm:1?label={token.label}")


def test_kms_uri_is_passed_to_securesystemslib_untouched() -> None:
    """otaguard does not interpret a KMS URI: securesystemslib's GCP signer gets it."""
    key = SSlibKey("ab" * 32, "ecdsa", "ecdsa-sha2-nistp256", {"public": "x"})
    with pytest.raises(ConfigError, match="UnsupportedLibraryError") as e:
        load_signer("gcpkms:projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
                    key, name="kms", secrets=lambda _n: b"unused")  # fmt: skip
    assert "google-cloud-kms" in str(e.value)


def test_cli_key_generate_and_list_in_token(token: SoftToken, tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")},
        passphrase_env_var("targets-hsm"): token.pin,
    }
    run = [sys.executable, "-m", "otaguard"]
    gen = subprocess.run(
        [*run, "key", "generate", "--uri", f"hsm:?label={token.label}", "--name", "targets-hsm",
         "--algorithm", "ecdsa-p384", "--out", str(tmp_path / "hsm.pub.json")],
        env=env, capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert f"hsm:1?label={token.label}" in gen.stdout
    lst = subprocess.run(
        [*run, "key", "list", "--token", token.label],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert lst.returncode == 0, lst.stderr
    assert "targets-hsm" in lst.stdout and "ecdsa-p384" in lst.stdout
    # a wrong PIN: one line, no traceback, non-zero
    env[passphrase_env_var("other")] = "1111-wrong"
    bad = subprocess.run(
        [*run, "key", "generate", "--uri", f"hsm:?label={token.label}", "--name", "other"],
        env=env, capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"key error: wrong PIN for token {token.label}"


def test_server_online_key_in_token_needs_its_pin(token: SoftToken, tmp_path: Path) -> None:
    made = generate_hsm_key(
        token_label=token.label, pin=token.pin, algorithm="ecdsa-p256", key_label="online"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    argv = [sys.executable, "-m", "otaguard", "server", "init", "--data", str(tmp_path / "srv"),
            "--online-key-uri", made.uri]  # fmt: skip
    no_pin = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert no_pin.returncode == 2
    assert (
        no_pin.stderr.strip()
        == f"key error: key online is in a PKCS#11 token ({made.uri}): its PIN is needed"
    )
    env["OTAGUARD_HSM_PIN"] = token.pin
    ok = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    from otaguard.crypto import read_public_key

    assert read_public_key(tmp_path / "srv" / "online-key.pub.json").keyid == made.public_key.keyid
    assert not (tmp_path / "srv" / "online-key.pem").exists()
    assert token.pin not in ok.stdout + ok.stderr
