"""Schemathesis hooks for the server's schema (loaded through ``SCHEMATHESIS_HOOKS``).

EST sends a CSR as ``application/pkcs10``: base64 text (RFC 7030 section 4.2), which
schemathesis has no serializer for; it goes on the wire as the text it is.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.serializer("application/pkcs10")
def pkcs10(_ctx: Any, value: Any) -> dict[str, Any]:
    """A generated CSR body: its text as UTF-8 (bytes as they are)."""
    if isinstance(value, bytes):
        return {"data": value}
    return {"data": str(value).encode("utf-8", "surrogatepass")}
