"""Development-only escape hatches, as named values.

An insecure choice is always spelled out (``tls=Unsafe.PLAIN_HTTP``), never implied by a
``None``: a caller that forgets an argument must get an error, not a device without TLS.
Every use warns (:class:`~otaguard.model.errors.InsecureModeWarning`).
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Unsafe"]


class Unsafe(Enum):
    """The development-only modes otaguard has; each one is named where it is used."""

    #: talk or serve HTTP without TLS: nothing is encrypted, the server is not authenticated
    PLAIN_HTTP = "plain-http"
    #: private signing keys stored unencrypted on disk
    PLAINTEXT_KEYS = "plaintext-keys"
    #: commit a new image as soon as it boots, without a health check that could fail
    NO_HEALTH_CHECK = "no-health-check"
    #: the device's TLS identity key is a plain file in the device directory, not held
    #: in a TPM or secure element (development key store until a hardware backend lands)
    FILE_DEVICE_KEY = "file-device-key"
