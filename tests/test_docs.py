"""The examples in every module's docstrings, and every code block of README.md and docs/, run
as written and print what the page says.

Every fenced block carries its language: ``python`` runs standalone (and, when the page follows it
with "prints" and a ``text`` block, prints exactly that); ``bash`` and ``console`` (``$ `` lines)
hold commands — each ``coopsgd`` command line parses with today's command line, each script named
exists and knows every option given, and ``coopsgd topology`` commands run and print the page's
output; ``toml`` is a configuration ``coopsgd train`` accepts; ``text`` is output or notation.
"""

import contextlib
import doctest
import importlib
import io
import pathlib
import pkgutil
import re
import shlex
import subprocess
import sys

import pytest

import coopsgd
from coopsgd import schedules, topology

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))]
LANGUAGES = {"python", "bash", "console", "toml", "text"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(coopsgd.__path__, "coopsgd."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_algorithms_md_table_zetas():
    # the table's m = 8 column, recomputed
    assert coopsgd.easgd(8).zeta == pytest.approx(0.8)
    assert round(coopsgd.dpsgd(topology.by_name("ring", 8)).zeta, 4) == 0.8047
    assert round(coopsgd.dpsgd(topology.by_name("ring", 8), "best_constant").zeta, 4) == 0.7445
    assert round(coopsgd.dpsgd(topology.by_name("exponential", 8)).zeta, 4) == 0.3333
    assert round(coopsgd.Algorithm(schedules.one_peer_exponential(8)).zeta, 4) == 0.8389


FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n(?:\nprints\n\n```text\n(.*?)^```\n)?", re.M | re.S)


def _blocks(page: str) -> list[tuple[str, str, str | None, int]]:
    """``(language, body, printed output or None, line)`` of every fenced block on the page."""
    text = (ROOT / page).read_text()
    return [(m.group(1), m.group(2), m.group(3), text[:m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def _all(language: str) -> list:
    return [pytest.param(page, body, out, id=f"{page}:{line}")
            for page in PAGES for lang, body, out, line in _blocks(page) if lang == language]


@pytest.mark.parametrize("page", PAGES)
def test_every_block_names_its_language(page):
    unlabelled = [line for lang, _, _, line in _blocks(page) if lang not in LANGUAGES]
    assert not unlabelled, f"{page}: blocks at lines {unlabelled} need one of {sorted(LANGUAGES)}"


@pytest.mark.parametrize("page,code,printed", _all("python"))
def test_python_blocks_run_as_written(page, code, printed, tmp_path, monkeypatch):
    from coopsgd.app import registry

    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))  # a block may register an algorithm
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, page, "exec"), {"__name__": "docs_example"})
    if printed is not None:
        assert out.getvalue() == printed
    if "Stop()" in code:  # engine.md's hooks example: called at 10, 20, 30 and stopped there
        assert [line.split(":")[0] for line in out.getvalue().splitlines()[:3]] == ["step 10", "step 20", "step 30"]
        assert out.getvalue().splitlines()[-1] == "30"
    if "counting_average" in code:
        assert out.getvalue().strip() == "3"


SETUP = ("python3 -m venv", "pip ", ".venv/bin/pip ", "python -m pytest", ".venv/bin/python -m pytest",
         "tensorboard --logdir", "mkdocs ")
"""Set-up commands: run by CI itself (README's two) or by the user's own tools, not here."""


def _command_lines(language: str, body: str) -> list[tuple[str, list[str]]]:
    """``(command, its output lines)`` of a bash or console block (continuations joined, comments,
    environment assignments, ``&`` and ``.venv/bin/`` dropped, ``&&`` chains split)."""
    if language == "console":
        pairs = []
        for line in body.splitlines():
            if line.startswith("$ "):
                pairs.append((line[2:], []))
            elif pairs:
                pairs[-1][1].append(line)
    else:
        joined = body.replace("\\\n", " ")
        pairs = [(line.split(" #")[0].strip(), []) for line in joined.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
    commands = []
    for command, out in pairs:
        parts = command.split("&&")
        for part in parts:
            words = shlex.split(part.strip().rstrip("&"))
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words.pop(0)
            if words:  # a chain's output belongs to its only command, or to none
                words = [w.removeprefix(".venv/bin/") for w in words]
                commands.append((" ".join(words), out if len(parts) == 1 else []))
    return commands


_HELP: dict = {}


def _script_help(script: str) -> str:
    if script not in _HELP:
        _HELP[script] = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                                       text=True, timeout=120, cwd=ROOT).stdout
    return _HELP[script]


@pytest.mark.parametrize("page,body,language",
                         [pytest.param(page, body, lang, id=f"{page}:{line}") for page in PAGES
                          for lang, body, _, line in _blocks(page) if lang in ("bash", "console")])
def test_commands_in_the_docs_exist_as_written(page, body, language, tmp_path, monkeypatch, capsys):
    from coopsgd.app import cli

    for command, printed in _command_lines(language, body):
        if command.startswith(SETUP):
            continue
        words = shlex.split(command)
        if words[0] == "coopsgd":
            argv = words[1:]
            parser, _ = cli.build_parser(argv)
            parser.parse_args(argv)  # an unknown or renamed option raises here
            if argv[0] == "topology" and language == "console":
                monkeypatch.chdir(tmp_path)
                capsys.readouterr()
                assert cli.main(argv) == 0
                assert capsys.readouterr().out.splitlines() == printed, command
        elif words[0] == "python" and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{page}: {words[1]} does not exist"
            help_text = _script_help(words[1])
            for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
                assert flag in help_text, f"{page}: {words[1]} has no option {flag}"
        else:
            pytest.fail(f"{page}: a command this test does not know how to check: {command!r}")


@pytest.mark.parametrize("page,body,printed", _all("toml"))
def test_toml_blocks_are_valid_configurations(page, body, printed, tmp_path):
    from coopsgd.app import config

    path = tmp_path / "run.toml"
    path.write_text(body)
    config.make_config(config.load_toml(path), strict=True)
