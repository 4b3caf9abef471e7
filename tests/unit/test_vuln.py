"""The vulnerability file parser (pure, bounded) and the matcher (purls, version ranges)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from otaguard.cli import main
from otaguard.model.vuln import (
    MAX_JSON_DEPTH,
    MAX_VULN_FILE_BYTES,
    AffectedPackage,
    AffectedRange,
    RangeEvent,
    Vulnerability,
    VulnerabilityFileError,
    parse_vulnerabilities,
)
from otaguard.server.vuln_match import is_affected, package_key


def osv(**over: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "schema_version": "1.6.0",
        "id": "OSV-2026-1",
        "modified": "2026-11-01T00:00:00Z",
        "summary": "OpenSSL: something bad",
        "aliases": ["CVE-2026-0001"],
        "affected": [
            {
                "package": {"purl": "pkg:generic/openssl"},
                "ranges": [
                    {"type": "SEMVER", "events": [{"introduced": "3.0.0"}, {"fixed": "3.0.14"}]},
                    {"type": "GIT", "repo": "https://x", "events": [{"introduced": "abc"}]},
                ],
            }
        ],
    }
    record.update(over)
    return record


def vex(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "version": 1,
        "components": [
            {
                "bom-ref": "ssl",
                "type": "library",
                "name": "openssl",
                "version": "3.0.13",
                "purl": "pkg:generic/openssl@3.0.13",
            },
        ],
        "vulnerabilities": [
            {"id": "CVE-2026-0002", "description": "d", "affects": [{"ref": "ssl"}]},
            {
                "id": "CVE-2026-0003",
                "affects": [
                    {
                        "ref": "pkg:generic/zlib",
                        "versions": [
                            {"range": "vers:generic/>=1.0.0|<1.3.2", "status": "affected"},
                            {"version": "1.4.0", "status": "unaffected"},
                        ],
                    }
                ],
            },
            {
                "id": "CVE-2026-0004",
                "affects": [{"ref": "ssl"}],
                "analysis": {"state": "not_affected"},
            },
        ],
    }
    doc.update(over)
    return doc


def _enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _one_range(kind: str, *events: dict[str, str]) -> bytes:
    rng = {"type": kind, "events": list(events)}
    return _enc(osv(affected=[{"package": {"purl": "pkg:generic/x"}, "ranges": [rng]}]))


def _vers(vers: str) -> AffectedPackage:
    return AffectedPackage("pkg:generic/zlib", (AffectedRange("VERS", (), vers),), ())


SSL = "pkg:generic/openssl"
FIXED_3014 = (("introduced", "3.0.0"), ("fixed", "3.0.14"))
LAST_3013 = (("introduced", "0"), ("last_affected", "3.0.13"))
REINTRODUCED = (("introduced", "1.0.0"), ("fixed", "1.2.0"), ("introduced", "2.0.0"))
DEB_FIX = (("introduced", "0"), ("fixed", "3.0.13-1~deb12u1"))
ZLIB_VERS = "vers:generic/>=1.0.0|<1.3.2"
DEEP = {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}


def parse(obj: Any) -> list[Vulnerability]:
    return parse_vulnerabilities(json.dumps(obj).encode())


def test_osv_record_and_list_are_read_git_ranges_dropped() -> None:
    (one,) = parse(osv())
    assert one.id == "OSV-2026-1" and one.source == "osv" and one.aliases == ("CVE-2026-0001",)
    (pkg,) = one.affected
    assert pkg.purl == "pkg:generic/openssl"
    assert pkg.ranges == (
        AffectedRange("SEMVER", (RangeEvent("introduced", "3.0.0"), RangeEvent("fixed", "3.0.14"))),
    )
    both = parse([osv(), osv(id="OSV-2026-2")])
    assert [v.id for v in both] == ["OSV-2026-1", "OSV-2026-2"]
    # an ecosystem + name without purl maps to the purl type (PyPI names lower-cased)
    (py,) = parse(osv(affected=[{"package": {"ecosystem": "PyPI", "name": "Django"},
                                  "versions": ["4.2.0"]}]))  # fmt: skip
    assert py.affected[0].purl == "pkg:pypi/django"
    # the normalised record survives storage
    assert Vulnerability.from_json(one.to_json()) == one


def test_vex_refs_resolve_to_components_and_not_affected_leaves_nothing() -> None:
    a, b, c = parse(vex())
    assert a.source == "cyclonedx-vex"
    assert a.affected == (AffectedPackage("pkg:generic/openssl", (), ("3.0.13",)),)
    assert b.affected == (_vers(ZLIB_VERS),)
    assert c.affected == ()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"{", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, f"nested deeper than {MAX_JSON_DEPTH}"),
        (_enc(DEEP), f"nested deeper than {MAX_JSON_DEPTH}"),
        (b"[]", "empty list"),
        (b"42", "neither an OSV record"),
        (_enc(osv(id=None)), "'id' missing"),
        (_enc(osv(id="x" * 2000)), "longer than 1024"),
        (_enc(osv(affected=[])), "no affected package"),
        (_enc(osv(affected=[{"package": {"purl": "openssl"}, "versions": ["1"]}])),
         "is not a purl"),
        (_one_range("SEMVER", {"fixed": "1"}), "no 'introduced' event"),
        (_one_range("SEMVER", {"broken": "1"}), "unknown event 'broken'"),
        (_one_range("GIT", {"introduced": "a"}), "no affected package"),
        (_enc([osv(), osv()]), "the same vulnerability id twice"),
        (_enc(vex(vulnerabilities=[{"id": "C", "affects": [{"ref": "nope"}]}])),
         "ref 'nope' is no component's bom-ref"),
        (_enc(vex(vulnerabilities=[])), "lists no vulnerabilities"),
        (b" " * (MAX_VULN_FILE_BYTES + 1), "larger than"),
    ],
)  # fmt: skip
def test_bad_files_are_refused_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(VulnerabilityFileError, match=problem.replace("(", r"\(")) as e:
        parse_vulnerabilities(data)
    assert "\n" not in e.value.diagnostics()


def test_cli_import_of_a_bad_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(osv(affected=[])))
    # refused before any server is contacted (none is given)
    assert main(["vuln", "import", str(bad), "--server", "https://127.0.0.1:9", "--ca",
                 str(bad), "--token-file", str(bad)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "no affected package with a purl and versions" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def _pkg(purl: str, *events: tuple[str, str], versions: tuple[str, ...] = ()) -> AffectedPackage:
    return AffectedPackage(
        purl, (AffectedRange("ECOSYSTEM", tuple(RangeEvent(k, v) for k, v in events)),), versions
    )


@pytest.mark.parametrize(
    ("package", "version", "expected"),
    [
        (_pkg(SSL, *FIXED_3014), "3.0.13", True),
        (_pkg(SSL, *FIXED_3014), "3.0.14", False),
        (_pkg(SSL, *FIXED_3014), "2.9.9", False),
        (_pkg(SSL, *FIXED_3014), "3.0.9", True),  # semver, not string order: 3.0.9 < 3.0.14
        (_pkg(SSL, *LAST_3013), "3.0.13", True),
        (_pkg(SSL, *LAST_3013), "3.0.14", False),
        (_pkg("pkg:generic/x", *REINTRODUCED), "1.5.0", False),  # between two ranges
        (_pkg("pkg:generic/x", *REINTRODUCED), "2.1.0", True),
        # PEP 440 for pypi: 2.0rc1 < 2.0
        (_pkg("pkg:pypi/django", ("introduced", "0"), ("fixed", "2.0")), "2.0rc1", True),
        # Debian versions for deb: revisions, and an epoch above any version without one
        (_pkg("pkg:deb/debian/openssl", *DEB_FIX), "3.0.11-1~deb12u2", True),
        (_pkg("pkg:deb/debian/openssl", *DEB_FIX), "1:1.0", False),
        (_pkg("pkg:generic/x", versions=("7",)), "7", True),
        (_vers(ZLIB_VERS), "1.3.1", True),
        (_vers(ZLIB_VERS), "1.3.2", False),
        # unparsable: counted as affected (fail closed), and no version at all too
        (_pkg("pkg:generic/x", ("introduced", "1.0.0")), "not a version!", True),
        (_pkg("pkg:generic/x", ("introduced", "1.0.0")), None, True),
    ],
)
def test_versions_in_and_out_of_ranges(
    package: AffectedPackage, version: str | None, expected: bool
) -> None:
    assert is_affected(package, version) is expected


def test_package_key_normalises_and_drops_the_version() -> None:
    assert package_key("pkg:generic/openssl@3.0.13?arch=arm") == "pkg:generic/openssl"
    assert package_key("pkg:pypi/Django@4.2") == "pkg:pypi/django"
    assert package_key("not a purl") is None


def test_exposure_episodes_from_a_check_in_history() -> None:
    import datetime as dt

    from otaguard.server.storage.vulns import CheckinPoint, StoredVuln
    from otaguard.server.vulns import _exposure

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def at(h: int) -> dt.datetime:
        return t0 + dt.timedelta(hours=h)

    (vuln,) = parse(osv())
    stored = StoredVuln(vuln, imported_at=at(10), imported_by="op")
    bad, good, unknown = {"B": "fw-1.0.0.img"}, {"G"}, "U"

    def run(*points: tuple[int, str]) -> tuple[dt.datetime, dt.datetime | None] | None:
        history = [CheckinPoint("d", at(h), img, img) for h, img in points]
        found = _exposure(stored, "d", history, bad, good)
        return None if found is None else (found.affected_since, found.patched_at)

    # ran it before the import, patched after: exposed since the operator knew
    assert run((1, "B"), (12, "G")) == (at(10), at(12))
    # started running it after the import
    assert run((11, "B"), (15, "G")) == (at(11), at(15))
    # patched before the import: not in the report
    assert run((1, "B"), (5, "G")) is None
    # an image the index does not know is not a patch
    assert run((1, "B"), (12, unknown)) == (at(10), None)
    # patched, then back on the affected release: the latest exposure, open
    assert run((1, "B"), (12, "G"), (14, "B")) == (at(14), None)
