"""``--compress`` and ``--delta-from`` of ``release add`` and ``release stage`` (ADR 0018)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from otaguard.model.transfer import COMPRESSION_FORMATS, Encodings

if TYPE_CHECKING:
    from tuf.api.metadata import Targets

    from otaguard.repo.transfer import TransferRequest

__all__ = ["add_transfer_options", "describe_encodings", "transfer_request"]


def add_transfer_options(p: argparse.ArgumentParser) -> None:
    """Add the encoding options to a release parser."""
    p.add_argument(
        "--compress",
        choices=COMPRESSION_FORMATS,
        help="also publish the image compressed (devices decode it while writing the slot)",
    )
    p.add_argument(
        "--delta-from",
        action="append",
        default=[],
        metavar="VERSION",
        help="also publish a delta from this published version (repeatable); devices "
        "running it download the delta, others the full image",
    )


def transfer_request(a: argparse.Namespace) -> TransferRequest:
    """The request the parsed options make."""
    from otaguard.repo.transfer import TransferRequest

    return TransferRequest(compress=a.compress, delta_from=tuple(a.delta_from))


def describe_encodings(targets: Targets, path: str, emit: Callable[[str], object]) -> None:
    """One line per encoding the image target ``path`` lists, with its share of the image."""
    tf = targets.targets[path]
    enc = Encodings.from_custom(tf.custom)
    rows = ([("compressed", enc.compressed)] if enc.compressed else []) + [
        (f"delta from {d.base_version}", d.blob) for d in enc.deltas
    ]
    for what, ref in rows:
        share = 100 * ref.length / tf.length
        emit(f"{what}: {ref.path} {ref.length} bytes ({share:.1f} % of the image)")
