"""The main-job example (examples/flax_cnn.py) runs in its quick mode and learns."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flax_cnn_quick(capsys):
    out = _load("flax_cnn").main(["--quick"])
    # 48 steps with tau = 4: one averaging every 4 steps.
    assert out["steps"] == 48 and out["rounds"] == 12
    assert out["last_loss"] < out["first_loss"]
    assert out["accuracy"] > 0.15  # above chance (0.1) after 48 steps
    assert "test accuracy of the averaged model" in capsys.readouterr().out
