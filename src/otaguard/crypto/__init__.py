"""Keys, signers and the certificate authority."""

from otaguard.crypto.ca import CertificateAuthority, ServerCredentials
from otaguard.crypto.keys import (
    ALGORITHMS,
    generate_signer,
    load_signer,
    warn_insecure,
    write_private_key,
)

__all__ = [
    "ALGORITHMS",
    "CertificateAuthority",
    "ServerCredentials",
    "generate_signer",
    "load_signer",
    "warn_insecure",
    "write_private_key",
]
