"""Signed canonical-JSON envelopes: ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``.

The shape of TUF metadata, for records a *device* signs (device manifests, issue 7's
reports): the signature covers the OLPC canonical JSON of ``signed`` (securesystemslib's
``encode_canonical``), so the server verifies exactly what the device signed whatever
whitespace or key order travelled. Signing goes through securesystemslib's ``Signer``,
so a file key, a TPM key or an HSM sign alike.
"""

from __future__ import annotations

import json
from typing import Any, Final

from securesystemslib.exceptions import FormatError, UnverifiedSignatureError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Key, Signature, Signer

from otaguard.model.errors import VerificationError

__all__ = ["MAX_ENVELOPE_BYTES", "open_envelope", "sign_envelope"]

#: a manifest with a full event log (256 events of ~150 bytes) and a quote stays far
#: below this; bigger is hostile and is refused before it is parsed
MAX_ENVELOPE_BYTES: Final = 64 * 1024


def _canonical(signed: Any) -> bytes:
    try:
        out = encode_canonical(signed)
    except FormatError as e:
        raise VerificationError("the signed record cannot be canonically encoded") from e
    assert isinstance(out, str)  # noqa: S101 - encode_canonical without output_function
    try:
        return out.encode("utf-8")
    except UnicodeEncodeError as e:
        # JSON may escape a lone surrogate ("\\ud800"), which no UTF-8 bytes can carry
        raise VerificationError("the signed record holds an invalid code point") from e


def sign_envelope(signer: Signer, signed: dict[str, Any]) -> bytes:
    """Sign ``signed`` (canonical JSON) and return the envelope's bytes."""
    sig = signer.sign(_canonical(signed))
    envelope = {"signed": signed, "signatures": [sig.to_dict()]}
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()


def open_envelope(data: bytes, *, key: Key) -> Any:
    """Verify an envelope signed by ``key`` and return its ``signed`` part.

    Checks, in order: (1) size cap, (2) JSON object with exactly ``signed`` and
    ``signatures``, (3) exactly one signature (a device has one key), (4) it verifies
    with ``key`` over the canonical JSON of ``signed``. The key id the signature names
    is not trusted for anything: only ``key`` is tried.

    Raises:
        VerificationError: any check failed; the message says which.
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise VerificationError(f"the signed record exceeds {MAX_ENVELOPE_BYTES} bytes")
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise VerificationError("the signed record is not JSON") from e
    if not isinstance(envelope, dict) or set(envelope) != {"signed", "signatures"}:
        raise VerificationError('the signed record must be {"signed": ..., "signatures": [...]}')
    sigs = envelope["signatures"]
    if not isinstance(sigs, list) or len(sigs) != 1:
        raise VerificationError("the signed record must carry exactly one signature")
    try:
        sig = Signature.from_dict(dict(sigs[0]))
    except (KeyError, TypeError, ValueError) as e:
        raise VerificationError("the signature is malformed") from e
    try:
        key.verify_signature(sig, _canonical(envelope["signed"]))
    except UnverifiedSignatureError as e:
        raise VerificationError(
            "the signature does not verify with the key of the client certificate"
        ) from e
    return envelope["signed"]
