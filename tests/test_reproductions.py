"""The reproductions: docs/reproductions.md and docs/scaling.md hold exactly the tables the script
prints for the configuration they name (the quick one, rerun here), and the script's timing of a
recorded run is the runtime model's rule worked out by hand."""

import importlib.util
import pathlib
import re
import sys

import numpy as np
import pytest

import coopsgd
from coopsgd.sim import runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- repro:(\w+):(\w+) -->\n(.*?)<!-- /repro -->", re.S)
QUICK = "coop,scaling"  # the tables docs/*.md mark as quick; the rest are recorded from a full run


def _script():
    sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("adaptive_reproductions", ROOT / "examples" / "adaptive_reproductions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _marked(mode):
    found = {}
    for page in ("reproductions.md", "scaling.md"):
        for m, key, body in MARK.findall((ROOT / "docs" / page).read_text()):
            if m == mode:
                found[key] = body
    return found


@pytest.fixture(scope="module")
def quick_tables(tmp_path_factory):
    return _script().main(["--quick", "--only", QUICK, "--out", str(tmp_path_factory.mktemp("img"))])


def test_the_docs_quick_tables_are_the_scripts(quick_tables):
    marked = _marked("quick")
    assert marked, "no quick tables marked in docs/reproductions.md or docs/scaling.md"
    for key, body in marked.items():
        assert key in quick_tables, f"docs mark a quick table {key!r} that --only {QUICK} does not produce"
        assert body == quick_tables[key] + "\n", f"table {key!r} in the docs differs from the script's quick run"


def test_every_full_table_is_filled():
    full = _marked("full")
    assert full and all(body.startswith("| ") and body.endswith("|\n") for body in full.values())


def test_bad_comparison_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        _script().main(["--only", "adacomm,nope"])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


def test_retime_is_the_clock_rule_by_hand():
    # local SGD, m = 8, tau = 4: every round is 4 steps of Y = 0.5 and one ring all-reduce of
    # P = 1000 bytes: 2·7/8·1000 = 1750 bytes in 14 messages; D = 14·1e-3 + 1750/1e5 = 0.0315.
    from reproductions.common import retime

    _script()
    algo = coopsgd.local_sgd(8, 4)
    rec = {"rounds": [(0, 4, 0, True), (4, 4, 1, True), (8, 2, 2, False)]}
    model = runtime.RuntimeModel(runtime.constant(0.5), runtime.network(1e-3, 1e5))
    d = 14 * 1e-3 + 1750 / 1e5
    np.testing.assert_allclose(retime(rec, algo, model, 1000.0), [0, 2 + d, 4 + 2 * d, 5 + 2 * d])
    # overlapped: the first round does not wait; the second waits for max(2, D) = 2.
    np.testing.assert_allclose(retime(rec, algo, model, 1000.0, overlap=True), [0, 2, 4, 5])


def test_system_ratio_inverts_the_allreduce_time():
    from reproductions.systems import SYSTEMS

    _script()
    s = SYSTEMS["adacomm"]
    # 2(m−1)·latency + 2(m−1)/m · P / B with m = 8: the paper's ratio and its inverse
    d = 14 * s.latency + 1.75 * s.param_bytes / s.bandwidth
    assert s.allreduce_seconds(8) == pytest.approx(d)
    assert s.allreduce_seconds(8, s.with_ratio(8, 3.0)) == pytest.approx(3.0 * s.step_seconds)
