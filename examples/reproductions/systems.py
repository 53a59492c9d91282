"""The system models: each paper's cluster as a runtime model, every number with where it comes
from ("found": read in the paper's abstract or the authors' public code; "recalled": the paper's
statement as remembered, not re-read; "assumed": the paper does not state it here, we chose it).

A system gives the model size in bytes P (what the engine's account ``mixing_traffic(W, P, v)``
is charged for), the per-step compute time Y of one worker, and the link's latency and bandwidth
(``coopsgd.sim.runtime.network``: ``messages · latency + bytes / bandwidth``).
"""

from __future__ import annotations

import dataclasses

from coopsgd.sim import runtime
from coopsgd.sim.scaling import GBPS

__all__ = ["System", "SYSTEMS", "VGG16_CIFAR", "RESNET18_CIFAR", "RESNET50_CIFAR", "MATCHA_GRAPH4"]

VGG16_CIFAR = 14.73e6
"""Parameters of VGG-16 for CIFAR-10 (13 conv layers + one 512→10 classifier; recalled)."""
RESNET18_CIFAR = 11.17e6
"""Parameters of ResNet-18 for CIFAR-10 (recalled; 11.2 M is the usual figure)."""
RESNET50_CIFAR = 23.52e6
"""Parameters of ResNet-50 for CIFAR-10 (recalled)."""

MATCHA_GRAPH4 = [[(2, 7), (3, 15), (13, 14), (8, 9), (1, 5), (0, 10), (6, 12), (4, 11)],
                 [(12, 11), (5, 6), (14, 1), (9, 10), (15, 2), (8, 13)],
                 [(12, 5), (11, 6), (1, 8), (9, 3), (2, 10)],
                 [(12, 14), (11, 9), (5, 15), (0, 6), (1, 7)],
                 [(12, 8), (5, 2), (11, 14), (1, 6)],
                 [(12, 15), (13, 11), (10, 5), (3, 14)],
                 [(12, 9)], [(0, 12)]]
"""The 16-node Erdős–Rényi base graph of the MATCHA paper's Fig. 3(b), as the authors' code lists
its matchings (found: JYWa/MATCHA, util.py, ``select_graph(4)``)."""


@dataclasses.dataclass(frozen=True)
class System:
    """One paper's cluster: model bytes, compute time per step, network, stragglers, and sources."""

    name: str
    param_bytes: float
    step_seconds: float
    latency: float
    bandwidth: float
    tail: float = 0.0
    straggler_prob: float = 0.0
    straggler_slowdown: float = 4.0
    sources: tuple = ()

    def runtime_model(self, seed: int = 0, *, bandwidth: float | None = None,
                      straggler_prob: float | None = None) -> runtime.RuntimeModel:
        """The runtime model: Y = (1 − tail)·step + Exp(tail·step), stragglers, and the network."""
        y = self.step_seconds
        compute = runtime.shifted_exponential(y * (1 - self.tail), y * self.tail) if self.tail \
            else runtime.constant(y)
        p = self.straggler_prob if straggler_prob is None else straggler_prob
        if p:
            compute = runtime.with_stragglers(compute, p, self.straggler_slowdown)
        return runtime.RuntimeModel(compute, runtime.network(self.latency, bandwidth or self.bandwidth), seed=seed)

    def allreduce_seconds(self, m: int, bandwidth: float | None = None) -> float:
        """D of one ring all-reduce of the model over m workers (2(m−1)/m·P bytes, 2(m−1) messages)."""
        return 2 * (m - 1) * self.latency + 2 * (m - 1) / m * self.param_bytes / (bandwidth or self.bandwidth)

    def with_ratio(self, m: int, ratio: float) -> float:
        """The bandwidth at which one all-reduce costs ``ratio`` mean compute steps (latency kept)."""
        budget = ratio * self.step_seconds - 2 * (m - 1) * self.latency
        if budget <= 0:
            raise ValueError(f"ratio {ratio} is below the latency floor of {self.name}")
        return 2 * (m - 1) / m * self.param_bytes / budget


SYSTEMS = {
    "adacomm": System(
        "AdaComm: VGG-16 / CIFAR-10, 10 Gbps", 4 * VGG16_CIFAR, 0.035, 50e-6, 10 * GBPS, tail=0.2,
        sources=("3x less time than fully synchronous SGD to the same training loss: found (abstract, arXiv:1810.08313)",
                 "VGG-16 on CIFAR-10, float32: recalled (the paper's main network); 14.7 M parameters = 58.9 MB",
                 "Y = 35 ms: assumed (3 x 0.31 GFLOP x batch 128 at 30 % of an 11 TFLOP/s 2018 GPU)",
                 "10 Gbps Ethernet, 50 us per message: assumed (the cluster's link is not stated here)",
                 "Y = 0.8 Y0 + Exp(0.2 Y0): assumed (the paper models Y as random; tail size not stated here)")),
    "adpsgd_100g": System(
        "ADPSGD: ResNet-18 / CIFAR-10, 100 Gbps", 4 * RESNET18_CIFAR, 0.045, 5e-6, 100 * GBPS,
        sources=("1.14-1.27x faster than full communication at 100 Gbps, 1.46-1.95x at 10 Gbps: found (abstract, arXiv:2007.06134)",
                 "100 Gbps and 10 Gbps links: found (abstract); 5 us (InfiniBand) and 50 us (Ethernet) per message: assumed",
                 "ResNet-18 on CIFAR-10, float32, 11.2 M parameters = 44.7 MB: assumed (one of the paper's image benchmarks)",
                 "Y = 45 ms: assumed (3 x 0.56 GFLOP x batch 128 at 30 % of a 15.7 TFLOP/s V100)")),
    "adpsgd_10g": System(
        "ADPSGD: ResNet-18 / CIFAR-10, 10 Gbps", 4 * RESNET18_CIFAR, 0.045, 50e-6, 10 * GBPS,
        sources=("as above, on the paper's 10 Gbps network",)),
    "coop": System(
        "Cooperative SGD: VGG-16 / CIFAR-10, 10 Gbps", 4 * VGG16_CIFAR, 0.035, 50e-6, 10 * GBPS,
        sources=("decentralized periodic averaging and EASGD with overlap >= 4x faster than fully synchronous SGD: "
                 "recalled (not in the abstract of arXiv:1808.07576)",
                 "network, model and compute: assumed, the same as AdaComm's (same authors, same period)")),
    "overlap": System(
        "Overlap Local-SGD: ResNet-18 / CIFAR-10, 10 Gbps", 4 * RESNET18_CIFAR, 0.045, 50e-6, 10 * GBPS, tail=0.2,
        straggler_slowdown=4.0,
        sources=("hides communication delays and mitigates stragglers: found (abstract, arXiv:2002.09539)",
                 "16 workers, ResNet-18 on CIFAR-10, tau = 2, alpha = 0.6, anchor momentum 0.7: found (authors' code, JYWa/Overlap_Local_SGD)",
                 "10 Gbps, 50 us, Y = 45 ms with a 20 % exponential tail: assumed",
                 "stragglers: each worker's step is 4x slower with probability p: assumed")),
    "matcha": System(
        "MATCHA: ResNet-50 / CIFAR-10, 10 Gbps", 4 * RESNET50_CIFAR, 0.106, 50e-6, 10 * GBPS,
        sources=("up to 5x less time than vanilla decentralized SGD to the same training loss: found (abstract, arXiv:1905.09435)",
                 "16-node Erdos-Renyi base graph (Fig. 3(b)), ResNet-50 on CIFAR-10, batch 128, budget 0.5: found (authors' code, JYWa/MATCHA)",
                 "Y = 106 ms: assumed (3 x 1.3 GFLOP x batch 128 at 30 % of a V100); 10 Gbps, 50 us: assumed")),
}
"""The system model of each comparison."""
