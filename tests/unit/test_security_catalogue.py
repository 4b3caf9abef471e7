"""docs/security.md names tests that exist: the catalogue cannot silently go stale."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "docs" / "security.md"


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_every_test_the_catalogue_names_exists() -> None:
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", CATALOGUE.read_text()))
    assert len(named) > 40
    missing = [
        f"{path}::{name}"
        for path, name in sorted(named)
        if not (ROOT / path).is_file() or name not in _functions(ROOT / path)
    ]
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"


def test_every_source_file_the_catalogue_names_exists() -> None:
    named = set(re.findall(r"`(src/otaguard/[\w/]+\.py)`", CATALOGUE.read_text()))
    assert named
    assert not [p for p in sorted(named) if not (ROOT / p).is_file()]
