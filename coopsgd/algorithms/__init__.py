"""The named algorithms of the literature, one module per family, each built as A(τ, W, v) (or a
schedule of W and τ) on :mod:`coopsgd.core`; those whose mixing is not linear carry their own
mixer, written on :mod:`coopsgd.parallel`'s protocol.

=================================== ==========================================================
module                              family
=================================== ==========================================================
:mod:`~coopsgd.algorithms.averaging` fully synchronous SGD, local SGD, hierarchical averaging
:mod:`~coopsgd.algorithms.easgd`     elastic averaging SGD
:mod:`~coopsgd.algorithms.decentralized` D-PSGD (both forms), decentralized periodic averaging
:mod:`~coopsgd.algorithms.overlap`   Overlap Local-SGD and Overlap-M
:mod:`~coopsgd.algorithms.outer`     global (outer) momentum: SlowMo, DiLoCo's outer step
:mod:`~coopsgd.algorithms.diloco`    DiLoCo and Streaming DiLoCo (outer optimizers in the round)
:mod:`~coopsgd.algorithms.compression` compressors (top-k, random-k, QSGD, scaled sign)
:mod:`~coopsgd.algorithms.choco`     CHOCO-SGD, compressed gossip
:mod:`~coopsgd.algorithms.push_sum`  push-sum / Stochastic Gradient Push on directed graphs
:mod:`~coopsgd.algorithms.tracking`  gradient tracking (DSGT)
:mod:`~coopsgd.algorithms.matcha`    MATCHA's random matchings
:mod:`~coopsgd.algorithms.adaptive`  AdaComm and ADPSGD periods
:mod:`~coopsgd.algorithms.batching`  adaptive batch-size tests
=================================== ==========================================================

The constructors are re-exported at the top level (``coopsgd.local_sgd``, ``coopsgd.matcha``, …);
this package exports its modules only, so no function shadows the module of the same name.
"""

from coopsgd.algorithms import (
                                adaptive,
                                averaging,
                                batching,
                                choco,
                                compression,
                                decentralized,
                                diloco,
                                easgd,
                                matcha,
                                outer,
                                overlap,
                                push_sum,
                                tracking,
)

__all__ = ["adaptive", "averaging", "batching", "choco", "compression", "decentralized", "diloco", "easgd",
           "matcha", "outer", "overlap", "push_sum", "tracking"]
