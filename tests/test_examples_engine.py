"""The engine's examples run in their quick mode (examples/multi_host.py: tests/test_multihost.py)."""
import importlib.util
import pathlib

import jax
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_schedule_quick():
    report = load("custom_schedule").main(["--quick"])
    assert report["steps"] == 12
    # τ = 1 for the first 40 steps: every step mixes; rounds alternate ring / exact average.
    assert report["communicating_steps"] == 12 and report["mixings"] == 12
    assert [c["kind"] for c in report["per_mixing"]] == ["neighbour", "all-reduce"]
    assert report["last_loss"] < report["first_loss"]
    assert report["final_consensus_distance"] < 1e-10  # the last mixing was an exact average


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced) devices")
def test_multi_device_quick():
    # m = 8: one worker per device (tests/test_backends.py covers two per device).
    report = load("multi_device").main(["--quick", "--workers", "8", "--algorithms", "ring_dpsgd"])
    assert report["devices"] == 8 and report["ring_dpsgd"]["plan"] == "neighbour"
    for backend in ("pmap", "shard_map"):
        assert report["ring_dpsgd"][backend]["max_abs_diff_vs_simulate"] < 1e-5
        ring = report["ring_dpsgd"][backend]["mixing_step_collectives"]
        assert ring == {"all-reduce": 0, "all-gather": 0, "collective-permute": 2}


def test_engine_doc_quick_start_runs():
    import re

    text = (EXAMPLES.parent / "docs" / "engine.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[0]
    scope: dict = {}
    exec(block, scope)  # noqa: S102 - the documented snippet, verbatim
    assert scope["metrics"].loss.shape == (100,)
    assert scope["u"]["w"].shape == (10,)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced) devices")
def test_sharded_model_quick():
    report = load("sharded_model").main(["--quick"])
    assert report["w1_per_device"] == [1, 64, 32] and report["w1_spec"] == "P('workers', None, 'model')"
    assert report["max_abs_diff_vs_simulate"] < 1e-5 and report["last_loss"] < report["first_loss"]
    # the averaging runs along "workers" as one all-reduce; everything else stays inside a group
    assert report["mixing_step_collectives"]["workers"] == {"all-reduce": 1}
    assert set(report["mixing_step_collectives"]) == {"workers", "model"}
