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


@njit(**_OPTS)
def _accumulate_any(M, rows, A, y, w, vi):  # pragma: no cover - numba
    """:func:`_accumulate_rows` with ``k = len(vi)`` a compile-time constant for k ≤ 8 (the
    loops over an event's values unroll: up to twice as fast) and an argument above. One
    function compiled once, whatever the formula; every branch gives the same bits."""
    k = vi.shape[0]
    if k == 1:
        _accumulate_rows(M, rows, A, y, w, vi, 1)
    elif k == 2:
        _accumulate_rows(M, rows, A, y, w, vi, 2)
    elif k == 3:
        _accumulate_rows(M, rows, A, y, w, vi, 3)
    elif k == 4:
        _accumulate_rows(M, rows, A, y, w, vi, 4)
    elif k == 5:
        _accumulate_rows(M, rows, A, y, w, vi, 5)
    elif k == 6:
        _accumulate_rows(M, rows, A, y, w, vi, 6)
    elif k == 7:
        _accumulate_rows(M, rows, A, y, w, vi, 7)
    elif k == 8:
        _accumulate_rows(M, rows, A, y, w, vi, 8)
    else:
        _accumulate_rows(M, rows, A, y, w, vi, k)


def accumulate_rows(M, rows, A, y, w, vi) -> None:
    """Add validated events of positive weight into their group rows (see
    :func:`_accumulate_rows`), without forgetting."""
    _accumulate_any(M, rows, A, y, w, vi)
