"""Batches for the trainer: the three sources ``run`` accepts, and the checks of their shapes and of
the loss on one worker's slice, made before anything compiles."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

__all__ = ["BatchSource", "check_leading", "check_loss"]


def check_leading(batch, m: int) -> None:
    """Every leaf of one step's batch has leading axis m."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = tuple(np.shape(leaf))
        if shape[:1] != (m,):
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} has leading axis "
                f"{shape[0] if shape else '() (a scalar)'} but there are m = {m} workers: "
                f"every batch leaf needs shape (m, ...) = ({m}, ...), got {shape}"
            )


def check_loss(loss_fn, params_spec, single_batch, *, has_aux: bool, with_rng: bool) -> None:
    """Trace ``loss_fn`` on one worker's params and batch slice (``jax.eval_shape``): it must run
    and return a scalar (or ``(scalar, aux)`` with ``has_aux``)."""
    args = (params_spec, single_batch) + ((jax.random.key(0),) if with_rng else ())
    try:
        out = jax.eval_shape(loss_fn, *args)
    except Exception as err:  # the user's function failed on one worker's batch
        raise ValueError(f"loss_fn failed on one worker's params and batch slice: {err}") from err
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"with has_aux=True loss_fn must return (loss, aux), got {out!r}")
        out = out[0]
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"loss_fn must return a scalar loss for one worker, got shape {shape} ({out!r}); "
            "reduce it (e.g. jnp.mean) or pass has_aux=True if it returns (loss, aux)"
        )


class BatchSource:
    """Batches for ``run``: a pytree of stacked leaves (steps, m, …), an iterator of per-step
    batches, or a callable ``step -> batch``; handed out as leaves (count, m, …).

    A callable receives the *global* step index (``state.step`` of the step it feeds), so a loop of
    ``run`` calls keeps drawing new batches.
    """

    def __init__(self, batches, steps: int, m: int, first_step: int = 0):
        self.m, self.steps, self.first_step = m, steps, first_step
        if isinstance(batches, Iterator):
            self.kind, self.it = "iter", batches
        elif callable(batches) and not isinstance(batches, (np.ndarray, jax.Array)):
            self.kind, self.fn = "callable", batches
        else:
            self.kind, self.tree = "stacked", batches
            for path, leaf in jax.tree_util.tree_flatten_with_path(batches)[0]:
                shape = tuple(np.shape(leaf))
                if len(shape) < 2 or shape[0] < steps or shape[1] != m:
                    raise ValueError(
                        f"batches{jax.tree_util.keystr(path)} has shape {shape} but run needs "
                        f"leaves of shape (steps, m, ...) with steps >= {steps} and m = {m}"
                    )

    def take(self, offset: int, count: int):
        """Batches ``offset … offset + count − 1`` of this run, leaves (count, m, …)."""
        if self.kind == "stacked":
            return jax.tree.map(
                lambda x: x if (offset == 0 and x.shape[0] == count) else x[offset: offset + count],
                self.tree)
        items = [self.fn(self.first_step + offset + i) if self.kind == "callable" else next(self.it)
                 for i in range(count)]
        for item in items:
            for path, leaf in jax.tree_util.tree_flatten_with_path(item)[0]:
                if tuple(np.shape(leaf))[:1] != (self.m,):
                    raise ValueError(
                        f"batch{jax.tree_util.keystr(path)} has shape {np.shape(leaf)} but every "
                        f"batch leaf needs leading axis m = {self.m}")
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)
