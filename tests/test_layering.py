"""loaders/ and zeroshot/ are leaves: they never import clipmoe (parsed, not imported)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["loaders", "zeroshot"])
def test_leaf_packages_do_not_import_clipmoe(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        assert "clipmoe" not in _imports(f), f


def test_model_knows_nothing_of_training():
    for name in ("model.py", "moe.py", "config.py"):
        assert not _imports(ROOT / "clipmoe" / name) & {"loaders", "zeroshot", "tqdm", "matplotlib"}, name
