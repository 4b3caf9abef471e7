"""Pure code of issue 7 items 4 and 7: the audit hash chain, tag filters, role order."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from otaguard.server.audit_chain import (
    GENESIS,
    AuditChainError,
    AuditEntry,
    entry_hash,
    verify_chain,
)
from otaguard.server.auth import Role, check_operator_name
from otaguard.server.tags import (
    format_filter,
    matches,
    parse_filter,
    parse_tag_assignments,
)

T0 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC)


def chain(n: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        fields = {
            "seq": seq,
            "time": T0 + dt.timedelta(seconds=seq, microseconds=7),
            "actor": f"op{seq}",
            "role": "operator",
            "action": "device.quarantine",
            "target": f"dev{seq}",
            "result": "ok",
            "request_id": f"req-{seq:08d}",
            "detail": "odd traffic",
            "prev": prev,
        }
        digest = entry_hash(**fields)  # type: ignore[arg-type]
        entries.append(AuditEntry(**fields, hash=digest))  # type: ignore[arg-type]
        prev = digest
    return entries


def test_an_intact_chain_verifies_and_gives_its_head() -> None:
    entries = chain(5)
    assert verify_chain(entries) == (5, entries[-1].hash)
    assert verify_chain([]) == (0, GENESIS)


def test_an_edited_entry_is_named() -> None:
    entries = chain(5)
    entries[2] = dataclasses.replace(entries[2], result="refused 403")
    with pytest.raises(AuditChainError, match=r"entry 3: its content does not match its hash"):
        verify_chain(entries)


def test_an_edited_and_rehashed_entry_is_caught_at_the_next_one() -> None:
    entries = chain(5)
    e = dataclasses.replace(entries[2], actor="someone-else")
    fields = {k: v for k, v in dataclasses.asdict(e).items() if k != "hash"}
    entries[2] = dataclasses.replace(e, hash=entry_hash(**fields))
    with pytest.raises(AuditChainError, match=r"entry 4: it does not follow entry 3"):
        verify_chain(entries)


def test_a_deleted_entry_is_named() -> None:
    entries = chain(5)
    del entries[1]
    with pytest.raises(AuditChainError, match=r"entry 3: expected entry 2"):
        verify_chain(entries)


def test_a_deleted_and_renumbered_entry_breaks_the_link() -> None:
    entries = chain(5)
    del entries[1]
    # Renumbering the rest keeps the sequence contiguous, but not the hashes.
    entries[1] = dataclasses.replace(entries[1], seq=2)
    with pytest.raises(AuditChainError, match=r"entry 2: it does not follow entry 1"):
        verify_chain(entries)


def test_the_time_is_hashed_to_the_microsecond_whatever_its_zone() -> None:
    e = chain(1)[0]
    naive = dataclasses.replace(e, time=e.time.replace(tzinfo=None))
    other_zone = dataclasses.replace(e, time=e.time.astimezone(dt.timezone(dt.timedelta(hours=2))))
    assert verify_chain([naive]) == verify_chain([other_zone]) == (1, e.hash)
    later = dataclasses.replace(e, time=e.time + dt.timedelta(microseconds=1))
    with pytest.raises(AuditChainError, match="entry 1"):
        verify_chain([later])


def test_tag_filters_parse_canonically_and_match_all_terms() -> None:
    f = parse_filter(" site=berlin , line=2")
    assert f == (("line", "2"), ("site", "berlin"))
    assert format_filter(f) == "line=2,site=berlin"
    assert matches(f, {"site": "berlin", "line": "2", "x": "y"})
    assert not matches(f, {"site": "berlin"})
    assert not matches(f, {"site": "berlin", "line": "3"})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty tag filter"),
        ("site", "expected key=value"),
        ("site=", "invalid value"),
        ("a b=c", "invalid tag key"),
        ("site=a=b", "invalid value"),
        ("site=a,site=b", "given twice"),
        (",".join(f"k{i}=v" for i in range(9)), "at most 8 terms"),
    ],
)
def test_malformed_filters_are_refused_with_the_rule(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_filter(text)


def test_tag_assignments() -> None:
    assert parse_tag_assignments(["site=berlin", "line=2"]) == {"site": "berlin", "line": "2"}
    with pytest.raises(ValueError, match="no tags given"):
        parse_tag_assignments([])
    with pytest.raises(ValueError, match="at most 32 tags"):
        parse_tag_assignments([f"k{i}=v" for i in range(33)])


def test_roles_are_ordered() -> None:
    assert [r.value for r in Role] == ["viewer", "operator", "release-manager", "admin"]
    assert Role.ADMIN.allows(Role.VIEWER) and Role.OPERATOR.allows(Role.OPERATOR)
    assert not Role.OPERATOR.allows(Role.RELEASE_MANAGER)
    assert not Role.VIEWER.allows(Role.OPERATOR)


@pytest.mark.parametrize(("name", "why"), [("bootstrap", "reserved"), ("local", "reserved"),
                                           ("Alice", "invalid"), ("", "invalid")])  # fmt: skip
def test_operator_names(name: str, why: str) -> None:
    assert check_operator_name("alice.ops-1") == "alice.ops-1"
    with pytest.raises(ValueError, match=why):
        check_operator_name(name)
