"""Elastic averaging SGD: m workers pulled toward one anchor z (v = 1) every τ local steps.

References:
    Zhang, Choromanska & LeCun, "Deep learning with elastic averaging SGD", NeurIPS 2015 (their
    α = ηρ); Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.2.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

from coopsgd.core.algorithm import Algorithm
from coopsgd.core.operator import MixingMatrix
from coopsgd.core.validate import require_choice, require_int
from coopsgd.parallel.linear import linear_unmixed

__all__ = ["FORMS", "easgd", "easgd_matrix"]

FORMS = ("cooperative", "zhang")
"""EASGD's two update orders (see :func:`easgd`)."""


def easgd_matrix(m: int, alpha: float) -> MixingMatrix:
    """EASGD's W_α with the anchor last: ``[[(1−α) I_m, α 1_m], [α 1_mᵀ, 1 − mα]]`` (O(m) memory)."""
    m = require_int("m", m, 1)
    col = np.full((m, 1), float(alpha))
    return MixingMatrix.from_blocks(sp.identity(m, format="csr") * (1.0 - alpha), col, col.T,
                                    np.array([[1.0 - m * alpha]]))


def easgd(m: int, tau=1, alpha: float | None = None,
          form: Literal["cooperative", "zhang"] = "cooperative") -> Algorithm:
    """Elastic averaging SGD with one anchor z (v = 1) and τ local steps between elastic pulls.

    ζ = max(|1−α|, |1−(m+1)α|) < 1 iff 0 < α < 2/(m+1); the default is the minimiser
    α* = 2/(m+2), where ζ* = m/(m+2). Two forms of the pull at the round's last step t:

    - ``"cooperative"`` (default; the Cooperative SGD form, as its authors' code runs it): the pull
      acts after the gradient step, ``x_i ← (1−α)(x_i − ηg_i) + α z``,
      ``z ← (1 − mα) z + α Σ_i (x_i − ηg_i)``;
    - ``"zhang"`` (synchronous EASGD, Zhang et al., eqs. 5–6): both at the same x_t,
      ``x_i ← x_i − η g_i(x_i) − α(x_i − z)``, ``z ← z + α Σ_i (x_i − z)``. It keeps one more
      copy of the models.

    References:
        Zhang, Choromanska & LeCun, "Deep learning with elastic averaging SGD", NeurIPS 2015,
        eqs. 5–6 (their α = ηρ); Wang & Joshi, "Cooperative SGD", arXiv:1808.07576, §3.2.
    """
    m = require_int("m", m, 1)
    form = require_choice("form", form, FORMS, "EASGD forms")
    if alpha is None:
        alpha = 2.0 / (m + 2)
    alpha = float(alpha)
    if not 0.0 < alpha < 2.0 / (m + 1):
        raise ValueError(
            f"EASGD alpha must lie in (0, 2/(m+1)) = (0, {2.0 / (m + 1):.6g}) for m = {m} "
            f"(otherwise zeta >= 1 and workers never agree), got alpha = {alpha!r}"
        )
    if form == "zhang":
        return Algorithm(easgd_matrix(m, alpha), tau=tau, v=1, name="easgd_zhang", mixer=linear_unmixed)
    return Algorithm(easgd_matrix(m, alpha), tau=tau, v=1, name="easgd")
