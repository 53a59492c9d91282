"""Batches for the trainer: the three sources ``run`` accepts, and the checks made before anything
compiles — of their shapes, of the initial params, and of the loss (and its model state) on one
worker's slice."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from coopsgd.core.validate import require_real_dtype
from coopsgd.parallel import programs

__all__ = ["BatchSource", "check_batch", "check_leading", "check_loss", "check_params", "check_state", "pad_steps"]


def check_params(params) -> None:
    """One worker's initial ``params``: array leaves of floats, every entry finite."""
    if not jax.tree.leaves(params):
        raise ValueError("params has no array leaves")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(leaf)
        name = jax.tree_util.keystr(path) or "params"
        if not jnp.issubdtype(arr.dtype, jnp.floating):  # np.issubdtype misses bfloat16
            raise ValueError(f"params{name} must be floating point, got dtype {arr.dtype}")
        finite = np.isfinite(arr.astype(np.float32))
        if not np.all(finite):
            raise ValueError(f"initial params{name} has {int(np.sum(~finite))} non-finite entries (NaN or Inf)")


def _fed(m: int, fed: int | None) -> str:
    return "" if fed in (None, m) else f" (or ({fed}, ...): the {fed} workers this process feeds)"


def check_leading(batch, m: int, fed: int | None = None) -> None:
    """Every leaf of one step's batch has leading axis m — or ``fed``, the workers this process
    feeds in a multi-process run — the same for every leaf."""
    allowed = {m} if fed is None else {m, fed}
    sizes = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = tuple(np.shape(leaf))
        if not shape or shape[0] not in allowed:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} has leading axis "
                f"{shape[0] if shape else '() (a scalar)'} but there are m = {m} workers: "
                f"every batch leaf needs shape (m, ...) = ({m}, ...){_fed(m, fed)}, got {shape}"
            )
        sizes.add(shape[0])
    if len(sizes) > 1:
        raise ValueError(f"batch leaves disagree on the worker axis: some have {min(sizes)} rows, some {max(sizes)}; "
                         f"either all m = {m} workers' batches or only this process's {fed}")


def check_state(given, returned) -> None:
    """The model state a loss returns has the structure, shapes and dtypes it was given (a state
    that changes shape would recompile, or break the scan, at every step)."""
    if jax.tree.structure(given) != jax.tree.structure(returned):
        raise ValueError(f"loss_fn returned a model state of structure {jax.tree.structure(returned)}, but was "
                         f"given {jax.tree.structure(given)}: the model state must keep its structure across steps")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(given)[0], jax.tree.leaves(returned)):
        if (tuple(a.shape), jnp.result_type(a)) != (tuple(b.shape), jnp.result_type(b)):
            raise ValueError(f"loss_fn returned model_state{jax.tree_util.keystr(path)} with shape {tuple(b.shape)} "
                             f"and dtype {jnp.result_type(b)}, but was given shape {tuple(a.shape)} and dtype "
                             f"{jnp.result_type(a)}: the model state must keep its shapes and dtypes across steps")


def check_loss(loss_fn, params_spec, single_batch, *, has_aux: bool, with_rng: bool, state_spec=None) -> None:
    """Trace ``loss_fn`` on one worker's params and batch slice (``jax.eval_shape``): it must run
    and return a scalar (or ``(scalar, aux)`` with ``has_aux``); with a ``state_spec`` (a loss with
    model state) it takes the state before the batch and returns ``(that, new_state)``, the new
    state shaped like the old."""
    state = () if state_spec is None else (state_spec,)
    args = (params_spec, *state, single_batch) + ((jax.random.key(0),) if with_rng else ())
    try:
        out = jax.eval_shape(loss_fn, *args)
    except Exception as err:  # the user's function failed on one worker's batch
        raise ValueError(f"loss_fn failed on one worker's params and batch slice: {err}") from err
    if state_spec is not None:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"with has_state=True loss_fn must return (loss, new_model_state), got {out!r}")
        out, new_state = out
        check_state(state_spec, new_state)
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


def check_batch(loss_fn, batches, params_spec, *, has_aux: bool, with_rng: bool, state_spec=None) -> None:
    """The loss on one worker's slice of ``batches`` (leaves (steps, m, …)) traces to a real
    floating scalar: checked once per process for a loss, batch slice, params and model state
    (:func:`~coopsgd.parallel.programs.check_once`)."""
    single = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape)[2:], x.dtype), batches)
    key = ("loss", programs.fingerprint(loss_fn), programs.avals((single, params_spec, state_spec)), has_aux,
           with_rng)
    programs.check_once(key, lambda: _check_slice(loss_fn, single, params_spec, has_aux=has_aux,
                                                  with_rng=with_rng, state_spec=state_spec))


def _check_slice(loss_fn, single, params_spec, *, has_aux: bool, with_rng: bool, state_spec) -> None:
    dtypes = []

    def recording(*args):  # the same trace, noting the loss's dtype for the check below
        out = loss_fn(*args)
        value = out[0] if state_spec is not None and isinstance(out, tuple) else out
        try:
            dtypes.append(jnp.result_type(value[0] if has_aux and isinstance(value, tuple) else value))
        except TypeError:  # not an array: check_loss names it
            pass
        return out

    check_loss(recording, params_spec, single, has_aux=has_aux, with_rng=with_rng, state_spec=state_spec)
    if dtypes:  # jax.grad needs a real floating loss
        require_real_dtype("loss_fn's output", dtypes[0], what="a real floating scalar (jax.grad needs one)",
                           fix="return a float loss (e.g. jnp.mean over float arrays; jnp.abs of a complex value)")


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
    ``run`` calls keeps drawing new batches. In a multi-process run the worker axis may hold only
    the ``fed`` workers of this process.
    """

    def __init__(self, batches, steps: int, m: int, first_step: int = 0, fed: int | None = None):
        self.m, self.steps, self.first_step, self.fed = m, steps, first_step, fed
        workers = {m} if fed is None else {m, fed}
        if isinstance(batches, Iterator):
            self.kind, self.it = "iter", batches
        elif callable(batches) and not isinstance(batches, (np.ndarray, jax.Array)):
            self.kind, self.fn = "callable", batches
        else:
            self.kind, self.tree = "stacked", batches
            if all(len(np.shape(x)) >= 2 and np.shape(x)[0] >= steps and np.shape(x)[1] in workers
                   for x in jax.tree.leaves(batches)):
                return
            for path, leaf in jax.tree_util.tree_flatten_with_path(batches)[0]:  # name the bad leaf
                shape = tuple(np.shape(leaf))
                if len(shape) < 2 or shape[0] < steps or shape[1] not in workers:
                    raise ValueError(
                        f"batches{jax.tree_util.keystr(path)} has shape {shape} but run needs "
                        f"leaves of shape (steps, m, ...) with steps >= {steps} and m = {m}{_fed(m, fed)}"
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
            check_leading(item, self.m, self.fed)
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *items)
