"""The house rules that import-linter does not check: private names, module size, package docs.

import-linter (``make lint``) checks that layers point one way and that no
package has import cycles; these tests check what it cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "batch"
#: The one module allowed past the size limit: the synthetic smear generator (one long recipe).
SIZE_EXEMPT = {"synth.py"}
MAX_MODULE_LINES = 700


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_another_modules_private_names(path: Path) -> None:
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("batch"):
            private = [
                a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")
            ]
            assert not private, f"{path.relative_to(ROOT)}:{node.lineno} imports {private} from {node.module}"


def test_every_module_is_under_the_size_limit() -> None:
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in _modules()
        if p.name not in SIZE_EXEMPT
    }
    assert {k: v for k, v in sizes.items() if v > MAX_MODULE_LINES} == {}


def test_every_package_says_what_lives_there() -> None:
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(_tree(init))
        assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} needs a docstring"


def test_one_definition_of_image_suffixes() -> None:
    homes = [
        str(p.relative_to(ROOT))
        for p in _modules()
        for node in ast.walk(_tree(p))
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id == "IMAGE_SUFFIXES"
    ]
    assert homes == ["batch/datasets/__init__.py"]
