"""The examples in every module's docstrings and in docs/algorithms.md run and print what the
docs say."""

import contextlib
import doctest
import importlib
import io
import pathlib
import pkgutil
import re

import pytest

import coopsgd
from coopsgd import schedules, topology

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
MODULES = sorted(m.name for m in pkgutil.walk_packages(coopsgd.__path__, "coopsgd."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


@pytest.mark.parametrize("page", ["algorithms.md", "adaptive.md"])
def test_worked_examples_print_what_the_page_says(page):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```\n\nprints\n\n```\n(.*?)```", text, re.DOTALL)
    assert blocks, f"docs/{page} lost its worked example"
    for code, expected in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"docs/{page}", "exec"), {"__name__": "docs_example"})
        assert out.getvalue() == expected


def test_algorithms_md_table_zetas():
    # the table's m = 8 column, recomputed
    assert coopsgd.easgd(8).zeta == pytest.approx(0.8)
    assert round(coopsgd.dpsgd(topology.by_name("ring", 8)).zeta, 4) == 0.8047
    assert round(coopsgd.dpsgd(topology.by_name("ring", 8), "best_constant").zeta, 4) == 0.7445
    assert round(coopsgd.dpsgd(topology.by_name("exponential", 8)).zeta, 4) == 0.3333
    assert round(coopsgd.Algorithm(schedules.one_peer_exponential(8)).zeta, 4) == 0.8389


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.DOTALL)


@pytest.mark.parametrize("index", range(len(_python_blocks("engine.md"))))
def test_engine_md_blocks_run_as_written(index):
    code = _python_blocks("engine.md")[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"docs/engine.md block {index}", "exec"), {"__name__": "docs_example"})
    if "Stop()" in code:  # the hooks example: called at 10, 20, 30 and stopped there
        assert [line.split(":")[0] for line in out.getvalue().splitlines()[:3]] == ["step 10", "step 20", "step 30"]
        assert out.getvalue().splitlines()[-1] == "30"
    if "counting_average" in code:
        assert out.getvalue().strip() == "3"
