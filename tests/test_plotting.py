"""Topology drawings place nodes by the graph's structure (positions derived by hand here) and
write real PNG files."""
import numpy as np

from coopsgd.app import plotting
from coopsgd.core import mixing, topology


def test_torus_is_drawn_on_its_grid():
    pos = plotting.topology_layout(topology.by_name("torus", 16), "torus")
    assert pos[0].tolist() == [0.0, 0.0] and pos[5].tolist() == [1.0, -1.0] and pos[15].tolist() == [3.0, -3.0]


def test_star_hub_in_the_centre_and_leaves_on_a_circle():
    pos = plotting.topology_layout(topology.by_name("star", 9), "star")
    assert np.allclose(pos[0], 0.0)
    radii = [np.linalg.norm(pos[i]) for i in range(1, 9)]
    assert np.allclose(radii, radii[0]) and radii[0] > 0.5


def test_hypercube_edges_are_its_axis_vectors():
    graph = topology.by_name("hypercube", 16)
    pos = plotting.topology_layout(graph, "hypercube")
    axes = [np.array([np.cos(np.pi * b / 4), np.sin(np.pi * b / 4)]) for b in range(4)]
    for i, j in graph.edges:
        bit = (i ^ j).bit_length() - 1  # neighbours differ in one bit
        assert np.allclose(np.abs(pos[j] - pos[i]), np.abs(axes[bit]))


def test_drawings_are_png_files(tmp_path):
    for name, n in [("torus", 9), ("ring", 6), ("path", 1)]:
        graph = topology.by_name(name, n)
        out = plotting.plot_topology(graph, mixing.metropolis(graph), tmp_path / f"{name}.png", name=name)
        assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
