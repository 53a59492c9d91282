"""mkdocs hooks: the site's home page is README.md, and the API reference is generated from the
package itself — one page per layer listing every public module, each rendered by mkdocstrings
from its docstrings — so no list of modules is kept by hand."""

from __future__ import annotations

import pathlib
import pkgutil
import re

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ("core", "algorithms", "parallel", "analysis", "sim", "app")
"""The packages of coopsgd, from the bottom layer up (docs/architecture.md)."""


def modules(layer: str) -> list[str]:
    """Every public module of ``coopsgd.<layer>``, found on disk (sub-packages included)."""
    found = []
    for info in pkgutil.walk_packages([str(ROOT / "coopsgd" / layer)], f"coopsgd.{layer}."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return sorted(found)


def api_page(layer: str) -> str:
    parts = [f"# `coopsgd.{layer}`\n", f"::: coopsgd.{layer}\n    options:\n      members: false\n"]
    for name in modules(layer):
        parts.append(f"::: {name}\n")
    return "\n".join(parts)


def home_page() -> str:
    """README.md with its links into docs/ made relative to the site."""
    text = (ROOT / "README.md").read_text()
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=home_page()))
    for layer in LAYERS:
        files.append(File.generated(config, f"api/{layer}.md", content=api_page(layer)))
    return files
