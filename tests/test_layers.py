"""Imports go one way: ``flows -> components -> models``; ``components`` never imports Prefect, ``models``
is pure torch. Checked on the source (AST), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.mark.parametrize(
    "path", sorted((REPO / "components").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO))
)
def test_components_import_neither_prefect_nor_flows(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if _top(n) in {"prefect", "flows"})
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: components never depend on Prefect or flows"


@pytest.mark.parametrize(
    "path", sorted((REPO / "models").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO))
)
def test_models_are_pure_torch(path: Path) -> None:
    bad = sorted(
        n for n in _imports(path) if _top(n) in {"components", "flows", "prefect", "mlflow", "pyiqa"}
    )
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: models/ is pure torch"
