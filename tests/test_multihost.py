"""A real two-process run: 2 processes × 2 CPU devices, ``jax.distributed`` on 127.0.0.1.

The example ``examples/multi_host.py`` launches the processes; here its result must equal the
same run on the simulate backend (local SGD, ring D-PSGD and EASGD, m = 8: two workers per device,
EASGD's anchor replicated on all four devices).
"""
import importlib.util
import pathlib

import numpy as np

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "multi_host.py"


def load_example():
    spec = importlib.util.spec_from_file_location("multi_host_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_equal_simulation():
    example = load_example()
    steps = 4
    multi = example.launch(steps, m=8, num_processes=2, local_devices=2)
    ref = example.simulate(steps, m=8)
    assert multi["devices"] == 4 and multi["local_devices"] == 2 and multi["process"] == 0
    for name in ("local_sgd", "ring_dpsgd", "easgd"):
        for key in ("w", "b", "loss"):
            np.testing.assert_allclose(multi[name][key], ref[name][key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}/{key}")
    # EASGD keeps its anchor: 8 workers + 1 auxiliary column came back.
    assert len(multi["easgd"]["b"]) == 9
