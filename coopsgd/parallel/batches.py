"""Batches for the trainer: the three sources ``run`` accepts, and the checks of their shapes and of
the loss on one worker's slice, made before anything compiles."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from coopsgd.core.validate import require_real_dtype

__all__ = ["BatchSource", "check_batch", "check_leading", "check_loss", "pad_steps"]


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


def check_batch(loss_fn, batches, params_spec, *, has_aux: bool, with_rng: bool, seen: set) -> None:
    """The loss on one worker's slice of ``batches`` (leaves (steps, m, …)) traces to a real
    floating scalar: checked once per batch signature (``seen`` holds the signatures checked)."""
    leaves, treedef = jax.tree.flatten(batches)
    sig = (treedef, tuple((tuple(x.shape)[2:], x.dtype) for x in leaves))
    if sig in seen:
        return
    single = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape)[2:], x.dtype), batches)
    dtypes = []

    def recording(*args):  # the same trace, noting the loss's dtype for the check below
        out = loss_fn(*args)
        try:
            dtypes.append(jnp.result_type(out[0] if has_aux and isinstance(out, tuple) else out))
        except TypeError:  # not an array: check_loss names it
            pass
        return out

    check_loss(recording, params_spec, single, has_aux=has_aux, with_rng=with_rng)
    if dtypes:  # jax.grad needs a real floating loss
        require_real_dtype("loss_fn's output", dtypes[0], what="a real floating scalar (jax.grad needs one)",
                           fix="return a float loss (e.g. jnp.mean over float arrays; jnp.abs of a complex value)")
    seen.add(sig)


def pad_steps(batches, steps: int):
    """Batches with leaves (count, m, …) padded with zeros to ``steps ≥ count`` along the first
    axis (NumPy leaves on the host, JAX arrays where they are)."""
    def one(x):
        extra = (steps - x.shape[0],) + tuple(x.shape[1:])
        if isinstance(x, jax.Array):
            return jax.numpy.concatenate([x, jax.numpy.zeros(extra, x.dtype)])
        x = np.asarray(x)
        return np.concatenate([x, np.zeros(extra, x.dtype)])

    return jax.tree.map(one, batches)


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
            if all(len(np.shape(x)) >= 2 and np.shape(x)[0] >= steps and np.shape(x)[1] == m
                   for x in jax.tree.leaves(batches)):
                return
            for path, leaf in jax.tree_util.tree_flatten_with_path(batches)[0]:  # name the bad leaf
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
