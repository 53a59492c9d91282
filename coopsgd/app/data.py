"""Data for the command line: the bundled 8×8 digits or a user's ``.npz``, split across workers.

Worker shards are either IID (a random equal partition) or non-IID with per-class proportions drawn
from a Dirichlet(α) distribution (Hsu, Qi & Brown, "Measuring the effects of non-identical data
distribution for federated visual classification", arXiv:1909.06335): small α gives each worker
few classes, large α approaches IID. Mini-batches are drawn with replacement from each worker's
shard by a generator seeded with ``(seed, step)`` alone, so a resumed run sees exactly the batches
an uninterrupted one would.
"""

from __future__ import annotations

import importlib.resources
import os
import zipfile
from typing import NamedTuple

import numpy as np

__all__ = [
    "SPLITS",
    "Dataset",
    "WorkerSampler",
    "load",
    "load_digits",
    "load_npz",
    "split",
    "split_dirichlet",
    "split_iid",
]

SPLITS = ("iid", "dirichlet")
"""Names of the ways to split the training set across workers."""


class Dataset(NamedTuple):
    """A train/test split; ``x`` float32 with examples on axis 0, ``y`` int32 labels in ``[0, C)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x_train.shape[1:])


def _holdout(x, y, test_fraction: float, seed: int, name: str, num_classes: int) -> Dataset:
    test_fraction = float(test_fraction)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction!r}")
    n = len(y)
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    if n - n_test < 1:
        raise ValueError(f"test_fraction = {test_fraction} leaves no training examples out of {n}")
    train, test = np.sort(order[n_test:]), np.sort(order[:n_test])
    return Dataset(x[train], y[train], x[test], y[test], num_classes, name)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The bundled 8×8 digits (1797 images, 10 classes) as ``(N, 8, 8, 1)`` floats in ``[0, 1]``.

    The file ships inside the package (``coopsgd/app/datasets/digits.npz``, made once from
    scikit-learn's bundled copy of the UCI data set; see ``coopsgd/app/datasets/README.md`` for its
    provenance and CC BY 4.0 licence). Nothing is downloaded.

    Examples:
        >>> ds = load_digits()
        >>> ds.x_train.shape[1:], ds.num_classes, len(ds.y_train) + len(ds.y_test)
        ((8, 8, 1), 10, 1797)
    """
    ref = importlib.resources.files("coopsgd.app") / "datasets" / "digits.npz"
    with importlib.resources.as_file(ref) as path, np.load(path, allow_pickle=False) as f:
        x = (f["x"].astype(np.float32) / 16.0)[..., None]
        y = f["y"].astype(np.int32)
    return _holdout(x, y, test_fraction, seed, "digits", 10)


def load_npz(path, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A user's ``.npz`` with arrays ``x`` (examples on axis 0) and ``y`` (integer labels ≥ 0).

    ``x`` is cast to float32 as it is (no rescaling); a 3-D ``x`` (N, H, W) gets a channel axis.
    The number of classes is ``max(y) + 1``.

    Raises:
        ValueError: the file is missing, not an ``.npz``, lacks ``x`` or ``y``, or its arrays break
            a rule (lengths differ, non-finite ``x``, non-integer or negative labels, < 2 examples).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array (a .npy), not named arrays x and y")
        with f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise ValueError(f"it lacks array(s) {missing} (found {sorted(f.files)})")
            x, y = f["x"], f["y"]
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"data file {path!r} is not a valid .npz with arrays x and y: {err}") from None
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise ValueError(f"data file {path!r}: x and y must be numeric, got {x.dtype} and {y.dtype}")
    if y.ndim != 1 or x.ndim < 2:
        raise ValueError(
            f"data file {path!r}: need x with shape (N, ...) and y with shape (N,), "
            f"got x {x.shape} and y {y.shape}"
        )
    if len(x) != len(y):
        raise ValueError(f"data file {path!r}: x has {len(x)} examples but y has {len(y)} labels")
    if len(y) < 2:
        raise ValueError(f"data file {path!r}: needs at least 2 examples, got {len(y)}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"data file {path!r}: x has non-finite values")
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)) or np.any(y < 0):
        raise ValueError(f"data file {path!r}: y must hold integer class labels >= 0")
    if y.max() >= len(y):
        raise ValueError(
            f"data file {path!r}: labels must be class numbers 0..K-1 with K at most the number of "
            f"examples ({len(y)}), got a label {int(y.max())}"
        )
    y = y.astype(np.int32)
    if x.ndim == 3:
        x = x[..., None]
    name = os.path.splitext(os.path.basename(path))[0]
    return _holdout(x, y, test_fraction, seed, name, int(y.max()) + 1)


def load(data=None, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """``None`` or ``"digits"``: the bundled digits; otherwise a path to an ``.npz``."""
    if data is None or data == "digits":
        return load_digits(test_fraction, seed)
    return load_npz(data, test_fraction, seed)


def _check_workers(m, n_examples: int) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"workers must be an integer >= 1, got {m!r}")
    if m > n_examples:
        raise ValueError(
            f"workers = {m} exceeds the {n_examples} training examples (each worker needs at least one)"
        )
    return int(m)


def split_iid(n_examples: int, m: int, seed: int = 0) -> list[np.ndarray]:
    """A random partition of ``range(n_examples)`` into ``m`` shards whose sizes differ by ≤ 1.

    Examples:
        >>> [len(s) for s in split_iid(10, 3)]
        [4, 3, 3]
    """
    m = _check_workers(m, n_examples)
    order = np.random.default_rng([seed, 1]).permutation(n_examples)
    return [np.sort(part) for part in np.array_split(order, m)]


def split_dirichlet(y, m: int, alpha: float, seed: int = 0) -> list[np.ndarray]:
    """Non-IID shards: each class's examples are divided among the ``m`` workers in proportions
    ``p ~ Dirichlet(α·1_m)`` (Hsu, Qi & Brown 2019, arXiv:1909.06335).

    Every worker is guaranteed at least one example: an empty worker takes one from the largest
    shard. The shards partition ``range(len(y))``.
    """
    y = np.asarray(y)
    m = _check_workers(m, len(y))
    alpha = float(alpha)
    if not (alpha > 0.0 and np.isfinite(alpha)):
        raise ValueError(f"Dirichlet alpha must be a positive finite number, got {alpha!r}")
    rng = np.random.default_rng([seed, 2])
    shards: list[list[int]] = [[] for _ in range(m)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(m, alpha))
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(int)
        for worker, part in enumerate(np.split(idx, cuts)):
            shards[worker].extend(part.tolist())
    for worker in range(m):
        if not shards[worker]:
            donor = max(range(m), key=lambda w: len(shards[w]))
            shards[worker].append(shards[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def split(y, m: int, how: str = "iid", alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Shards by name: ``"iid"`` (:func:`split_iid`) or ``"dirichlet"`` (:func:`split_dirichlet`)."""
    if how == "iid":
        return split_iid(len(y), m, seed)
    if how == "dirichlet":
        return split_dirichlet(y, m, alpha, seed)
    raise ValueError(f"unknown split {how!r}; valid splits: {', '.join(SPLITS)}")


class WorkerSampler:
    """Per-worker mini-batches: ``batch(step)`` → ``{"x": (m, B, …), "y": (m, B)}``.

    Worker ``i`` draws ``B`` examples with replacement from its own shard, using a generator seeded
    by ``(seed, step)`` only, so batches are a pure function of the step (resumable, reproducible).
    ``batches(start, count)`` stacks ``count`` consecutive steps on a leading axis.
    """

    def __init__(self, x, y, shards, batch_size: int, seed: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not shards or any(len(s) == 0 for s in shards):
            raise ValueError("every worker needs a non-empty shard")
        self.x, self.y = np.asarray(x), np.asarray(y)
        self.shards = [np.asarray(s) for s in shards]
        self.m, self.batch_size, self.seed = len(shards), int(batch_size), int(seed)
        self._sizes = np.array([len(s) for s in self.shards])
        width = int(self._sizes.max())
        # Pad shards to a rectangle; padding is never drawn (draws are < each shard's size).
        self._table = np.stack([np.resize(s, width) for s in self.shards])

    def indices(self, step: int) -> np.ndarray:
        """The ``(m, B)`` example indices of step ``step``."""
        rng = np.random.default_rng([self.seed, 3, int(step)])
        pos = (rng.random((self.m, self.batch_size)) * self._sizes[:, None]).astype(np.int64)
        return np.take_along_axis(self._table, pos, axis=1)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of step ``step``: ``x`` and ``y`` of shape (m, batch_size, …), a pure function of (seed, step)."""
        idx = self.indices(step)
        return {"x": self.x[idx], "y": self.y[idx]}

    def batches(self, start: int, count: int) -> dict[str, np.ndarray]:
        """The batches of steps ``start … start + count − 1`` stacked on a leading axis."""
        idx = np.stack([self.indices(start + k) for k in range(count)])
        return {"x": self.x[idx], "y": self.y[idx]}
