"""Restricting the TLS 1.3 key-exchange groups, which Python 3.11's ``ssl`` cannot do.

Mozilla's "modern" profile (TLS 1.3 only) allows X25519, P-256 and P-384; OpenSSL also
offers X448 and P-521 by default. ``SSLContext`` exposes no ``set_groups`` before Python
3.13, so this calls OpenSSL's ``SSL_CTX_set1_groups_list`` through ctypes on the context's
``SSL_CTX``. The pointer is read from CPython's ``PySSLContext`` layout and *checked*
first (OpenSSL's options of that pointer must equal Python's view of them); if anything
does not match, nothing is changed and the caller is told so, so a different Python or
OpenSSL degrades to OpenSSL's defaults instead of crashing.
"""

from __future__ import annotations

import ctypes
import ssl
from typing import Final

__all__ = ["MODERN_GROUPS", "restrict_groups"]

#: Mozilla "modern" key-exchange groups, preferred first
MODERN_GROUPS: Final = "X25519:P-256:P-384"
# OpenSSL's control code for SSL_CTX_set1_groups_list (ssl.h: SSL_CTRL_SET_GROUPS_LIST).
_SSL_CTRL_SET_GROUPS_LIST: Final = 92
# The libssl Python's _ssl is linked against on Debian 12 (OpenSSL 3).
_LIBSSL: Final = "libssl.so.3"


def restrict_groups(ctx: ssl.SSLContext, groups: str = MODERN_GROUPS) -> bool:
    """Limit ``ctx`` to the key-exchange ``groups``; return False when that is not possible."""
    if not ssl.OPENSSL_VERSION.startswith("OpenSSL 3."):
        return False
    try:
        lib = ctypes.CDLL(_LIBSSL)
    except OSError:
        return False
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    # PySSLContext starts with PyObject_HEAD (refcount, type), then `SSL_CTX *ctx`.
    pointer = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != ctx.options:
        return False
    result: int = lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode())
    return result == 1
