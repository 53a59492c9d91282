"""The API reference: the documentation site builds in strict mode (a broken link or reference, or
an unparsable docstring, fails), and every public name — everything a module lists in
``__all__`` and every public method of those classes — has a docstring (its own, or the one of the
method it overrides)."""

import pathlib
import subprocess
import sys

import pytest

griffe = pytest.importorskip("griffe", reason="the docs extra (pip install -e '.[docs]') builds the site")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _documented(obj) -> bool:
    return bool(obj.docstring and obj.docstring.value.strip())


def _inherits_doc(cls, name: str) -> bool:
    """Whether a base class of ``cls`` (within the package) documents the method ``name``."""
    try:
        bases = cls.mro()
    except Exception:  # a base outside the package: nothing to inherit from here
        return False
    return any(name in base.members and _documented(base.members[name]) for base in bases)


def _modules():
    """Every public module of the package, loaded statically by griffe (no import)."""
    def visit(module):
        yield module
        for name, sub in module.modules.items():
            if not name.startswith("_"):
                yield from visit(sub)

    yield from visit(griffe.load("coopsgd", search_paths=[str(ROOT)], resolve_aliases=False))


def _undocumented() -> list[str]:
    missing = []
    for module in _modules():
        for name in module.exports or ():
            obj = module.members.get(str(name))
            if obj is None or obj.is_alias:  # re-exported: checked where it is defined
                continue
            if not _documented(obj):
                missing.append(obj.path)
            if obj.is_class:
                for method, member in obj.members.items():
                    if (not method.startswith("_") and not member.is_alias and member.is_function
                            and not _documented(member) and not _inherits_doc(obj, method)):
                        missing.append(member.path)
    return missing


def test_every_public_name_has_a_docstring():
    missing = _undocumented()
    assert not missing, f"{len(missing)} public names without a docstring: {', '.join(missing)}"


def test_every_module_lists_its_public_names():
    unlisted = [module.path for module in _modules() if module.exports is None]
    assert not unlisted, f"modules without __all__: {unlisted}"


def test_the_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # every layer's API page holds every public module of the layer
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import docs_hooks
    finally:
        sys.path.pop(0)
    for layer in docs_hooks.LAYERS:
        page = (tmp_path / "api" / layer / "index.html").read_text()
        for module in docs_hooks.modules(layer):
            assert f'id="{module}"' in page, f"{module} missing from api/{layer}"
