"""The package's layers: imports point down only (read from every module's source, lazy imports
inside functions included), no module is over 500 lines, and the top-level module only
re-exports."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "coopsgd"

MAY_IMPORT = {
    "core": {"core"},
    "parallel": {"core", "parallel"},
    "algorithms": {"core", "parallel", "algorithms"},
    "analysis": {"core", "algorithms", "parallel", "analysis"},
    "sim": {"core", "sim"},
    "app": {"core", "algorithms", "parallel", "analysis", "sim", "app", "top"},
}
PACKAGES = set(MAY_IMPORT)
MODULES = sorted(p for p in ROOT.rglob("*.py") if p.parent != ROOT)


def _coopsgd_imports(path: pathlib.Path) -> set[str]:
    """The coopsgd layers a module imports (``coopsgd.x.y`` → ``x``; a name of the top-level API,
    ``from coopsgd import CooperativeSGD``, → ``top``, which only ``app`` may use)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "coopsgd" \
                else [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "coopsgd" and len(parts) > 1:
                found.add(parts[1] if parts[1] in PACKAGES else "top")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    layer = path.relative_to(ROOT).parts[0]
    upward = _coopsgd_imports(path) - MAY_IMPORT[layer]
    assert not upward, f"coopsgd/{path.relative_to(ROOT)} ({layer}) imports {sorted(upward)}"


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500


def test_top_level_only_reexports():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Import", "Assign"}  # docstring, imports, __version__, __all__
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    assert assigned == {"__version__", "__all__"}


def test_the_layers_are_the_folders():
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("__")} == set(MAY_IMPORT)
