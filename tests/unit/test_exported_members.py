"""Every public package declares __all__, and every name in it exists."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "otaguard",
    "otaguard.model",
    "otaguard.crypto",
    "otaguard.repo",
    "otaguard.agent",
    "otaguard.server",
    "otaguard.server.storage",
    "otaguard.sim",
    "otaguard.cli",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_names_exist(name: str) -> None:
    mod = importlib.import_module(name)
    assert mod.__all__, f"{name} has an empty __all__"
    for member in mod.__all__:
        assert hasattr(mod, member), f"{name}.__all__ names missing {member}"


def test_model_imports_no_other_component() -> None:
    import ast
    from pathlib import Path

    src = Path(importlib.import_module("otaguard.model").__file__).parent  # type: ignore[arg-type]
    for py in src.glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("otaguard.")
            ):
                assert node.module.startswith("otaguard.model"), f"{py.name} imports {node.module}"


def test_agent_and_server_do_not_import_each_other() -> None:
    import ast
    from pathlib import Path

    root = Path(importlib.import_module("otaguard").__file__).parent  # type: ignore[arg-type]
    for a, b in (("agent", "otaguard.server"), ("server", "otaguard.agent")):
        for py in (root / a).rglob("*.py"):
            for node in ast.walk(ast.parse(py.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert not node.module.startswith(b), f"{a}/{py.name} imports {node.module}"
