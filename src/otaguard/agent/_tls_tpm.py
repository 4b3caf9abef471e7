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
* **Digests stay in software.** tpm2-openssl also offers SHA-2 and a random generator,
  but under the property ``tpm2.digest``; hashlib and TLS keep using the default provider
  (checked by the tests: hashing is not slowed down after the load).
"""

from __future__ import annotations

import ctypes
import os
import ssl
import threading
from typing import Final

from otaguard.model.errors import ConfigError

__all__ = ["TCTI_ENV", "load_tpm_provider"]

#: the environment variable tpm2-openssl reads its TCTI from, once, when it is loaded
TCTI_ENV: Final = "TPM2OPENSSL_TCTI"
_PROVIDER: Final = b"tpm2"
_PREFER_DEFAULT: Final = b"?provider=default"

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
        ConfigError: the provider is missing (``apt-get install tpm2-openssl``), Python's
            ssl is not OpenSSL 3, or the process already uses another TPM.
    """
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
        # Prefer the default provider for every algorithm both offer. Without this,
        # OpenSSL may pick tpm2's ECDSA for a *software* key (the TLS server of the same
        # process, in tests and the demo), export it into the TPM provider as a public key
        # only, and fail with "EVP lib". TPM keys still sign in the TPM: OpenSSL falls back
        # to the key's own provider when a key cannot be exported to the preferred one.
        if lib.EVP_set_default_properties(None, _PREFER_DEFAULT) != 1:
            raise ConfigError("OpenSSL refused the default property query")
        _loaded_tcti = tcti
