"""Keys, signers addressed by URI, the certificate authorities (fleet, device, manufacturer)."""

from otaguard.crypto.ca import CertificateAuthority, ServerCredentials
from otaguard.crypto.hsm import HSM_SCHEME, generate_hsm_key, hsm_public_key
from otaguard.crypto.keys import (
    ALGORITHMS,
    generate_signer,
    warn_insecure,
    write_private_key,
)
from otaguard.crypto.manufacturer import ManufacturerCA, verify_factory_certificate
from otaguard.crypto.signers import (
    ENCRYPTED_FILE_SCHEME,
    PLAINTEXT_FILE_SCHEME,
    EncryptedFileSigner,
    KeySecrets,
    Passphrases,
    load_signer,
    read_public_key,
    resolve_key_uri,
    write_public_key,
)

__all__ = [
    "ALGORITHMS",
    "ENCRYPTED_FILE_SCHEME",
    "HSM_SCHEME",
    "PLAINTEXT_FILE_SCHEME",
    "CertificateAuthority",
    "EncryptedFileSigner",
    "KeySecrets",
    "ManufacturerCA",
    "Passphrases",
    "ServerCredentials",
    "generate_hsm_key",
    "generate_signer",
    "hsm_public_key",
    "load_signer",
    "read_public_key",
    "resolve_key_uri",
    "verify_factory_certificate",
    "warn_insecure",
    "write_private_key",
    "write_public_key",
]
