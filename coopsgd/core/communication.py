"""What one mixing sends: the record every layer shares (the engine's plans produce it, the runtime
model charges time for it, result tables sum it).

Costs follow the usual models: a bandwidth-optimal ring all-reduce of P bytes over m workers sends
``2(m − 1)/m · P`` bytes in ``2(m − 1)`` messages per worker (Patarasuk & Yuan, "Bandwidth optimal
all-reduce algorithms for clusters of workstations", JPDC 69(2), 2009); a neighbour exchange sends
one message of P bytes per neighbour slot; an all-gather ``(m − 1) · P`` bytes in ``m − 1``
messages.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["NONE", "Communication", "Kind", "ring_all_reduce_bytes"]

Kind = Literal["none", "all-reduce", "neighbour", "dense"]
"""How a mixing moves data: nothing, all-reduces, neighbour exchanges, or an all-gather."""


class Communication(NamedTuple):
    """What one mixing sends, per worker.

    Attributes:
        kind: one of :data:`Kind`.
        bytes_per_worker: bytes each worker sends (the busiest worker: the critical path's bytes).
        messages: point-to-point messages per worker, in sequence (the latency term).
        all_reduces: model-sized vectors all-reduced.
        neighbour_slots: shifted copies (neighbour exchanges) per mixing.
        m: the number of workers (``total_bytes = m · bytes_per_worker``).
    """

    kind: Kind
    bytes_per_worker: float
    messages: int
    all_reduces: int
    neighbour_slots: int
    m: int = 1

    @property
    def total_bytes(self) -> float:
        """Bytes sent by all workers together."""
        return self.bytes_per_worker * self.m

    @property
    def moves(self) -> bool:
        """Whether anything is sent."""
        return self.kind != "none"


NONE = Communication("none", 0.0, 0, 0, 0)
"""A mixing that sends nothing."""


def ring_all_reduce_bytes(m: int, param_bytes: float) -> float:
    """Bytes one worker sends in a ring all-reduce of ``param_bytes`` over ``m`` workers."""
    return 2.0 * (m - 1) / m * float(param_bytes) if m > 1 else 0.0
