"""Data flows one way (docs/architecture.md): what each package may import, and the API never reaching through a
gallery into its store."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package -> the project's packages it must never import (the ones above it).
ABOVE = {"index": {"retrieval", "finetune", "api"}, "retrieval": {"finetune", "api"}, "finetune": {"api"}}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _trees(package: str) -> list[tuple[str, ast.AST]]:
    return [(p.relative_to(ROOT).as_posix(), ast.parse(p.read_text(encoding="utf-8"))) for p in _modules(package)]


def _imported(tree: ast.AST) -> set[str]:
    """Top-level package names imported anywhere in ``tree`` (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_a_package_imports_only_the_packages_below_it(package: str) -> None:
    wrong = {path: sorted(_imported(tree) & ABOVE[package]) for path, tree in _trees(package)}
    assert not {path: names for path, names in wrong.items() if names}


#: Names whose ``.store`` is not a gallery's: argparse namespaces (``args.store`` is the ``--store`` option).
_NOT_GALLERIES = {"args"}


def _through_store(tree: ast.AST) -> list[str]:
    """Every reach for a gallery's store, as source text: ``X.store`` however it is used (``g.store.ids()``,
    ``f(g.store)``, ``s = self.gallery.store``) but ``args.store``, and ``getattr(X, "store")``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "store":
            if not (isinstance(node.value, ast.Name) and node.value.id in _NOT_GALLERIES):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "store"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return sorted(set(found))


def test_the_store_check_sees_every_way_of_reaching_it() -> None:
    """The check missed a store passed whole (``f(g.store)``) or read by name (``getattr(gallery, "store")``)."""
    reaches = ["f(g.store)", "getattr(gallery, 'store')", "g.store.ids()", "x = self.gallery.store",
               "hasattr(g, 'store')"]
    for code in reaches:
        assert _through_store(ast.parse(code)), code
    assert _through_store(ast.parse("build(store=args.store)\nfrom index.store import source_file")) == []


def test_the_api_never_reaches_through_a_gallery_into_its_store() -> None:
    """The edges call the gallery's (or retrieval's) public reads, never its store (``Gallery.source_path`` for a
    thumbnail): the store is the index layer's own."""
    assert _trees("api")
    found = {path: hits for path, tree in _trees("api") if (hits := _through_store(tree))}
    assert not found


#: The packages whose modules docs/architecture.md's "Modules" table lists.
PACKAGES = ("index", "retrieval", "finetune", "api")


def _table_names() -> set[str]:
    """Every backticked name in docs/architecture.md's "Modules" section (a module's path, or a folder's with
    ``/``)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`([^`\s]+)`", section))


def _unlisted(names: set[str]) -> list[str]:
    """The module files of :data:`PACKAGES` that ``names`` leaves out: a file counts as listed by its own path or by
    a folder row (``api/cli/``) above it; a package's ``__init__.py`` by the package table above the Modules table."""
    folders = {n for n in names if n.endswith("/")}
    missing = []
    for package in PACKAGES:
        for path in _modules(package):
            rel = path.relative_to(ROOT).as_posix()
            if rel == f"{package}/__init__.py" or rel in names:
                continue
            if not any(rel.startswith(folder) for folder in folders):
                missing.append(rel)
    return missing


def test_the_modules_table_names_every_module() -> None:
    """docs/architecture.md's Modules table is where a newcomer looks for a module's job: a module added without its
    row (the venom advice, the S3 write lease were) makes the table wrong. Add the row to the table."""
    assert not _unlisted(_table_names()), "add these modules to docs/architecture.md's Modules table"


def test_the_modules_table_check_sees_a_missing_module() -> None:
    names = _table_names()
    assert "retrieval/advice.py" in names
    assert "retrieval/advice.py" in _unlisted(names - {"retrieval/advice.py"})
    assert not [m for m in _unlisted(names - {"api/cli/"}) if not m.startswith("api/cli/")]
    assert "api/cli/identify.py" in _unlisted(names - {"api/cli/"})
