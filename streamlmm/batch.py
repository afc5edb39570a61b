"""numba kernels for batches of events (``learn_many``, the stream engine).

The arithmetic is :func:`streamlmm.kernels._add_event`'s (West's weighted update), in
the same order, so a batch gives the same bits as a ``learn_one`` loop; only the
layout of the loop differs (one group row and the event's deviation held locally,
the packed co-moments walked in order), which makes it about twice as fast as
:func:`streamlmm.kernels.accumulate`, whose forgetting it leaves to that kernel.

"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["accumulate_rows"]

_OPTS = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(inline="always", **_OPTS)
def _accumulate_rows(M, rows, A, y, w, vi, k):  # pragma: no cover - numba
    """Add events into their groups' rows in event order, without forgetting.

    Event ``e`` goes to row ``rows[e]`` with ``v = [A[e, vi], y[e]]`` and
    frequency weight ``w[e] > 0``: ``n += w``, ``m += (w/n)d``, ``C += w(n₀/n)dd'``
    with ``d = v − m_old``; ``C`` is packed row by row (``kernels.packed_index``).
    """
    m = k + 1
    d = np.empty(m)
    for e in range(rows.shape[0]):
        Mr = M[rows[e]]
        we = w[e]
        n0 = Mr[0]
        n1 = n0 + we
        Mr[0] = n1
        if n1 <= 0.0:
            continue
        f = we / n1
        g = we * n0 / n1
        for i in range(k):
            d[i] = A[e, vi[i]] - Mr[1 + i]
        d[k] = y[e] - Mr[m]
        c = 1 + m
        for i in range(m):
            Mr[1 + i] += f * d[i]
            gd = g * d[i]
            for j in range(i, m):
                Mr[c] += gd * d[j]
                c += 1


_BY_K: dict[int, object] = {}


def accumulate_rows(M, rows, A, y, w, vi) -> None:
    """:func:`_accumulate_rows` compiled for this number of columns ``k = len(vi)`` (a
    constant there, so the loops over the event's values unroll; numba caches each)."""
    k = int(vi.shape[0])
    fn = _BY_K.get(k)
    if fn is None:
        fn = _BY_K[k] = _compile_accumulate(k)
    fn(M, rows, A, y, w, vi)


def _compile_accumulate(k: int):
    @njit(**_OPTS)
    def accumulate_k(M, rows, A, y, w, vi):  # pragma: no cover - numba
        _accumulate_rows(M, rows, A, y, w, vi, k)

    return accumulate_k
