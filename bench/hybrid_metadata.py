"""What the hybrid policy costs a device: metadata size and verify time, classical vs hybrid.

Two signing set-ups for root and targets, each threshold 2 of 2:

* classical: Ed25519 + ECDSA P-256 (what k-of-n allows without the policy);
* hybrid: Ed25519 + ML-DSA-65, targets and root marked ``x-otaguard-hybrid`` (ADR 0014).

For each it prints the signed metadata size (bytes) and the time a device spends
verifying it: python-tuf's threshold check (``Root.verify_delegate``) plus, for hybrid,
otaguard's policy check (which verifies the signatures again; a device pays both).
Targets lists ``TARGETS`` images. Times are the median of ``ROUNDS`` runs; the ratio is
hybrid over classical, measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, Role, Root, TargetFile, Targets

from otaguard.crypto.hybrid import check_hybrid, mark_hybrid
from otaguard.crypto.keys import generate_signer

TARGETS = 50  # images listed: a few years of releases for a few hardware ids
ROUNDS = 200


def _root(signers: list[Signer], *, hybrid: bool) -> Root:
    root = Root(expires=datetime.now(UTC) + timedelta(days=365))
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.roles[role] = Role([], threshold=2 if role in ("root", "targets") else 1)
    for s in signers:
        root.add_key(s.public_key, "root")
        root.add_key(s.public_key, "targets")
    root.add_key(signers[0].public_key, "snapshot")
    root.add_key(signers[0].public_key, "timestamp")
    if hybrid:
        mark_hybrid(root, "root")
        mark_hybrid(root, "targets")
    return root


def _targets() -> Targets:
    t = Targets(expires=datetime.now(UTC) + timedelta(days=90))
    for i in range(TARGETS):
        path = f"fw-{i // 10}.{i % 10}.0.img"
        t.targets[path] = TargetFile(
            8 * 1024 * 1024,
            {"sha256": f"{i:064x}"},
            path,
            unrecognized_fields={"custom": {"version": f"{i // 10}.{i % 10}.0"}},
        )
    return t


def _median_us(fn: Callable[[], None]) -> float:
    fn()
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure(signers: list[Signer], *, hybrid: bool) -> dict[str, tuple[int, float]]:
    """Per role: (signed bytes, median verify microseconds)."""
    root = _root(signers, hybrid=hybrid)
    out = {}
    for role, signed in (("root", root), ("targets", _targets())):
        md: Metadata[Root | Targets] = Metadata(signed)
        for s in signers:
            md.sign(s, append=True)
        data = md.to_bytes()

        def verify(data: bytes = data, role: str = role) -> None:
            parsed = Metadata.from_bytes(data)
            root.verify_delegate(role, parsed.signed_bytes, parsed.signatures)
            if hybrid:
                check_hybrid(root, role, parsed.signed_bytes, parsed.signatures)

        out[role] = (len(data), _median_us(verify))
    return out


def main() -> None:
    """Print the figures."""
    ed = generate_signer("ed25519")
    classical = measure([ed, CryptoSigner.generate_ecdsa()], hybrid=False)
    hybrid = measure([ed, generate_signer("ml-dsa-65")], hybrid=True)
    print(f"hybrid metadata: {TARGETS} targets, median of {ROUNDS} verifications")
    print(f"{'role':8} {'set-up':28} {'bytes':>8} {'verify us':>10}")
    for role in ("root", "targets"):
        for label, figures in (
            ("classical Ed25519+ECDSA", classical),
            ("hybrid Ed25519+ML-DSA-65", hybrid),
        ):
            size, us = figures[role]
            print(f"{role:8} {label:28} {size:8d} {us:10.0f}")
        (cs, ct), (hs, ht) = classical[role], hybrid[role]
        print(f"{role:8} {'ratio hybrid/classical':28} {hs / cs:8.2f} {ht / ct:10.2f}")


if __name__ == "__main__":
    main()
