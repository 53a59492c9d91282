"""Reading a compiled program's collectives: which mesh axes each one runs along.

XLA prints a collective's device groups as explicit lists (``replica_groups={{0,2},{1,3}}``), as an
iota (``replica_groups=[4,2]<=[8]``, optionally transposed, ``[2,4]<=[4,2]T(1,0)``: the device ids
0 … n−1 reshaped, transposed and cut into rows), or, for a collective-permute, as source-target
pairs. :func:`collectives` turns each into the set of mesh axes along which the devices of a
group differ — so a test or a user can check that a mixing communicates along ``"workers"`` only
while a sharded model's own collectives stay inside a worker's group.

Example:
    >>> line = "%ar = f32[4] all-reduce(%x), replica_groups={{0,2,4,6},{1,3,5,7}}, to_apply=%add"
    >>> collectives(line, {"workers": 4, "model": 2})
    [('all-reduce', ('workers',))]
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["KINDS", "collectives", "counts", "device_groups"]

KINDS = ("all-reduce", "all-gather", "collective-permute", "reduce-scatter", "all-to-all")
"""The collectives counted."""

_OP = re.compile(r"= \S+ (" + "|".join(KINDS) + r")(?:-start)?\(")
_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_LIST = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")


def device_groups(line: str, devices: int) -> list[list[int]]:
    """The device groups of one HLO collective (a permute's source-target pairs as pairs).

    Raises:
        ValueError: for a line whose groups are in none of the three forms.
    """
    if "source_target_pairs=" in line:
        pairs = line.split("source_target_pairs=", 1)[1].split("}}", 1)[0]
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs)]
    iota = _IOTA.search(line)
    if iota:
        ids = np.arange(devices).reshape([int(x) for x in iota.group(2).split(",")])
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        return ids.reshape([int(x) for x in iota.group(1).split(",")]).tolist()
    listed = _LIST.search(line)
    if listed:
        groups = [list(map(int, g.split(","))) for g in re.findall(r"\{([\d,]+)\}", listed.group(1))]
        return groups or [list(range(devices))]  # {} means every device, one group
    raise ValueError(f"no device groups found in {line.strip()[:120]!r}")


def counts(hlo: str) -> dict[str, int]:
    """How many collectives of each of :data:`KINDS` a compiled program's text contains."""
    found = [op.group(1) for op in map(_OP.search, hlo.splitlines()) if op]
    return {kind: found.count(kind) for kind in KINDS}


def collectives(hlo: str, mesh_shape: dict[str, int]) -> list[tuple[str, tuple[str, ...]]]:
    """Every collective of a compiled program's text (``lowered.compile().as_text()``), with the
    mesh axes along which its groups' devices differ, for devices numbered row-major over
    ``mesh_shape`` (``dict(mesh.shape)``, as ``jax.make_mesh`` lays out ``jax.devices()``)."""
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    devices = int(np.prod(sizes))
    out = []
    for line in hlo.splitlines():
        op = _OP.search(line)
        if not op:
            continue
        coords = [np.unravel_index(np.asarray(g), sizes) for g in device_groups(line, devices)]
        spans = tuple(name for a, name in enumerate(names) if any(len(set(c[a].tolist())) > 1 for c in coords))
        out.append((op.group(1), spans))
    return out
