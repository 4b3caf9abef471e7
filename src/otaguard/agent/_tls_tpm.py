"""Let Python's ``ssl`` present a TPM-held key: the tpm2 OpenSSL provider, loaded by ctypes.

Python's ``ssl`` (3.11) has no API for OpenSSL providers, but ``SSLContext.load_cert_chain``
reads the key with OpenSSL 3's decoders, which ask every *loaded* provider. Debian's
tpm2-openssl provider (``tpm2.so``) decodes a ``TSS2 PRIVATE KEY`` PEM into a key whose
operations run inside the TPM. So loading that provider into the OpenSSL library that
``_ssl`` itself uses is all it takes; the key file then works like any other.

What was measured, and the traps:

* **The same libcrypto.** ``ctypes.CDLL("libcrypto.so.3")`` could be another copy than the
  one ``_ssl`` uses (a static build, a venv with a bundled OpenSSL). The provider is
  loaded through the ``_ssl`` extension's own handle: ``dlsym`` on it searches its
  dependencies, so ``OSSL_PROVIDER_load`` is the function of the libcrypto ``ssl`` uses.
* **The TCTI is read once.** The provider takes its TCTI from ``TPM2OPENSSL_TCTI`` when it
  is *loaded*, and OpenSSL 3.0 has no call to pass it as a provider parameter
  (``OSSL_PROVIDER_add_conf_parameter`` is 3.2). So the variable is set just before the
  load, and a process serves one TPM: asking for a second TCTI is refused, not ignored.
* **The provider holds its TPM connection for the life of the process.** A second client
  (tpm2-pytss, for the NV counters and for signing) cannot share a raw ``swtpm:`` or
  ``device:/dev/tpm0`` connection with it; the TCTI must be a resource manager: the
  kernel's ``device:/dev/tpmrm0`` or tpm2-abrmd (``tabrmd:``).
* **Which provider signs.** OpenSSL 3.0 fetches the ECDSA implementation first and then
  *exports* the key into that implementation's provider. A TPM key exports to the default
  provider as its public half only, and signing fails ("EVP lib", "missing private key");
  a software key exported into tpm2 fails the same way. Loading order does not help (the
  default provider is already active when Python starts). So the default property query
  prefers ``tpm2.signature``: TPM keys sign in the TPM. The price: in a process with the
  provider loaded, Python's ``ssl`` cannot sign with a software key (a TLS *server* with a
  file key): the agent never does, and tests run TPM agents in child processes.
* **Digests stay in software.** tpm2-openssl also offers SHA-1/SHA-2 (``tpm2.digest``),
  a CTR-DRBG (``tpm2.rand``) and AES/Camellia-CTR (``tpm2.cipher``). Preferring tpm2 for
  everything sent ``hashlib.sha256`` of 50 MB through the TPM: 41 s instead of 0.07 s.
  The query excludes them, so hashing, randomness and record encryption stay in software.
"""

from __future__ import annotations

import ctypes
import os
import re
import ssl
import threading
from typing import Final

from otaguard.model.errors import ConfigError

__all__ = ["TCTI_ENV", "load_tpm_provider"]

#: the environment variable tpm2-openssl reads its TCTI from, once, when it is loaded
TCTI_ENV: Final = "TPM2OPENSSL_TCTI"
_PROVIDER: Final = b"tpm2"
#: OpenSSL's default property query once the provider is loaded: signatures preferably
#: from tpm2 (a TPM key cannot sign anywhere else); tpm2's digests, random generator and
#: ciphers never (a boolean property "=no" also matches where it is undefined)
_PROPERTY_QUERY: Final = b"?tpm2.signature,tpm2.digest=no,tpm2.rand=no,tpm2.cipher=no"

#: TCTIs that serve one client at a time: the provider would hold the TPM for the life of
#: the process and the next tpm2-pytss call (an NV counter) would wait forever
_SINGLE_CLIENT: Final = re.compile(r"(swtpm|mssim)(:.*)?|device(:/dev/tpm[0-9]+)?")

_lock = threading.Lock()
_loaded_tcti: str | None = None


def _libcrypto() -> ctypes.CDLL:
    """The libcrypto Python's ``ssl`` is linked against (through ``_ssl``'s handle)."""
    import _ssl

    path = getattr(_ssl, "__file__", None)
    if not ssl.OPENSSL_VERSION.startswith("OpenSSL 3.") or path is None:
        raise ConfigError(
            f"a TPM-held TLS key needs Python's ssl on OpenSSL 3 (this is {ssl.OPENSSL_VERSION})"
        )
    lib = ctypes.CDLL(path)
    lib.OSSL_PROVIDER_load.restype = ctypes.c_void_p
    lib.OSSL_PROVIDER_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.EVP_set_default_properties.restype = ctypes.c_int
    lib.EVP_set_default_properties.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


def load_tpm_provider(tcti: str) -> None:
    """Make ``ssl`` able to load ``TSS2 PRIVATE KEY`` files held by the TPM at ``tcti``.

    Idempotent for the same TCTI.

    Raises:
        ConfigError: ``tcti`` is not a resource manager, the provider is missing
            (``apt-get install tpm2-openssl``), Python's ssl is not OpenSSL 3, or the
            process already uses another TPM.
    """
    if _SINGLE_CLIENT.fullmatch(tcti):
        raise ConfigError(
            f"the TPM at {tcti!r} serves one client at a time, but a TPM-held TLS key needs "
            "a resource manager: use tpm2-abrmd (tabrmd:...) or device:/dev/tpmrm0"
        )
    global _loaded_tcti  # noqa: PLW0603 - one provider per process is OpenSSL's state
    with _lock:
        if _loaded_tcti == tcti:
            return
        if _loaded_tcti is not None:
            raise ConfigError(
                f"this process already presents TLS keys of the TPM at {_loaded_tcti!r}; "
                f"the tpm2 OpenSSL provider serves one TPM per process, not also {tcti!r}"
            )
        lib = _libcrypto()
        os.environ[TCTI_ENV] = tcti
        # The default provider first: an explicit load would otherwise stop OpenSSL from
        # loading it on demand, and every non-TPM operation needs it.
        if not lib.OSSL_PROVIDER_load(None, b"default"):
            raise ConfigError("OpenSSL's default provider cannot be loaded")
        if not lib.OSSL_PROVIDER_load(None, _PROVIDER):
            raise ConfigError(
                "OpenSSL cannot load the tpm2 provider (apt-get install tpm2-openssl) "
                f"or it cannot reach the TPM at {tcti!r}"
            )
        # Which provider serves what (measured; see the module docstring and ADR 0006).
        if lib.EVP_set_default_properties(None, _PROPERTY_QUERY) != 1:
            raise ConfigError("OpenSSL refused the tpm2 provider's property query")
        _loaded_tcti = tcti
