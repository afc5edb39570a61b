"""Predictions with standard errors and 95% intervals from one snapshot.

For an event ``x`` of group ``g`` with fixed-effect design row ``x`` and random-effect
design row ``z``:

* point value: :meth:`Snapshot.predict` (``x'β̂ + z'b̂_g``; ``x'β̂`` for an unseen group);
* seen group, a *conditional prediction interval* for a new observation of that group:
  ``Var = x'V_β x + z'C_g z + σ²``, with ``V_β`` the fixed effects' covariance
  (``fixef_vcov``) and ``C_g`` the group's conditional covariance (lme4 ``condVar``).
  The covariance between β̂ and b̂_g is left out, as in the usual lme4 recipe
  (``predictInterval``-style), so the interval is slightly narrow when β̂ is uncertain;
* unseen group (or no group): a *population prediction interval*: the fixed part only,
  with the prior covariance ``re_cov`` (``VarCorr``) in place of ``C_g``.

The interval is ``prediction ± 1.959964 · se`` (normal).

"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamlmm.keys import check_key
from streamlmm.snapshot import Snapshot

__all__ = ["design_rows", "predict_event", "predict_events", "Z95", "CONDITIONAL", "POPULATION"]

Z95 = 1.959963984540054
CONDITIONAL = "conditional"
POPULATION = "population"


def _layout(snapshot: Snapshot):
    """The snapshot's encoder and, for its kept fixed columns and its random columns,
    their positions in the encoder's union vector (built once per snapshot)."""
    cached = _LAYOUTS.get(id(snapshot))
    if cached is not None and cached[0] is snapshot:
        return cached[1]
    d = snapshot._encoder()
    cols = {c: i for i, c in enumerate(d.columns)}
    kept = [i for i, v in enumerate(snapshot.fixef.values()) if v == v]
    xi = np.array([cols[n] for n in np.array(list(snapshot.fixef))[kept]], dtype=np.int64)
    zi = np.array([cols[n] for n in snapshot.re_names], dtype=np.int64)
    vcov = np.asarray(snapshot.fixef_vcov)[np.ix_(kept, kept)]
    layout = (d, xi, zi, vcov)
    _LAYOUTS.clear()  # one snapshot at a time is served
    _LAYOUTS[id(snapshot)] = (snapshot, layout)
    return layout


_LAYOUTS: dict[int, tuple[Snapshot, tuple]] = {}


def design_rows(snapshot: Snapshot, x: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The fixed-effect (kept columns) and random-effect design rows of one event, from
    the formula's encoder at the snapshot's factor levels (factors, interactions and
    transforms included; an unseen level is a ``ValueError`` naming the field).

    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 + x | g)")
    >>> for i in range(40):
    ...     m.learn_one({"g": i % 4, "x": float(i % 7)}, float(i % 5))
    >>> xr, zr = design_rows(m.snapshot(), {"g": 1, "x": 2.5})
    >>> xr.tolist(), zr.tolist()
    ([1.0, 2.5], [1.0, 2.5])

    """
    d, xi, zi, _ = _layout(snapshot)
    try:
        a = d.encode_one(x, np.empty(max(d.k, 1)), learn=False)
    except ValueError as e:  # a missing value included
        raise ValueError(str(e)) from None
    return a[xi], a[zi]


def predict_event(snapshot: Snapshot, x: Mapping[str, Any]) -> dict[str, Any]:
    """One event's prediction, standard error and 95% interval, JSON-ready.

    ``ValueError`` for a missing or non-numeric field or an invalid group key.

    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 | g)")
    >>> for i in range(40):
    ...     m.learn_one({"g": i % 4, "x": float(i % 7)}, float(i % 5) + i % 4)
    >>> s = m.snapshot()
    >>> p = predict_event(s, {"g": 2, "x": 1.0})
    >>> p["prediction"] == s.predict({"g": 2, "x": 1.0}), p["interval_kind"], p["group_seen"]
    (True, 'conditional', True)
    >>> predict_event(s, {"g": "new", "x": 1.0})["interval_kind"]
    'population'

    """
    if not isinstance(x, Mapping):
        raise ValueError("an event must be a JSON object")
    f = snapshot._formula
    raw = x.get(f.group)
    key = None if raw is None else check_key(raw, f.group)
    xr, zr = design_rows(snapshot, x)
    r = snapshot._index.get(key, -1) if key is not None else -1
    yhat = snapshot.predict(x)
    C = snapshot.condvar[r] if r >= 0 else snapshot.re_cov
    vcov = _layout(snapshot)[3]
    var = float(xr @ vcov @ xr + zr @ C @ zr + snapshot.sigma**2)
    se = math.sqrt(var) if var >= 0 else math.nan
    return {
        "group": key,
        "prediction": yhat,
        "se": se,
        "lower": yhat - Z95 * se,
        "upper": yhat + Z95 * se,
        "group_seen": r >= 0,
        "interval_kind": CONDITIONAL if r >= 0 else POPULATION,
    }


def predict_events(snapshot: Snapshot, events: list) -> list[dict[str, Any]]:
    """:func:`predict_event` for many events, the variances computed in one pass.

    ``ValueError`` naming the event's index for the first bad event.

    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 | g)")
    >>> for i in range(40):
    ...     m.learn_one({"g": i % 4, "x": float(i % 7)}, float(i % 5) + i % 4)
    >>> s = m.snapshot()
    >>> evs = [{"g": 2, "x": 1.0}, {"g": "new", "x": 3.0}]
    >>> predict_events(s, evs) == [predict_event(s, e) for e in evs]
    True

    """
    f = snapshot._formula
    n = len(events)
    keys: list = [None] * n
    rows = np.full(n, -1, dtype=np.int64)
    X = np.empty((n, len(_layout(snapshot)[1])))
    Z = np.empty((n, len(snapshot.re_names)))
    yhat = np.empty(n)
    index = snapshot._index
    for i, x in enumerate(events):
        try:
            if not isinstance(x, Mapping):
                raise ValueError("an event must be a JSON object")
            raw = x.get(f.group)
            key = None if raw is None else check_key(raw, f.group)
            X[i], Z[i] = design_rows(snapshot, x)
            yhat[i] = snapshot.predict(x)
        except ValueError as e:
            raise ValueError(f"event {i}: {e}") from e
        keys[i] = key
        if key is not None:
            rows[i] = index.get(key, -1)
    seen = rows >= 0
    C = np.array(np.broadcast_to(snapshot.re_cov, (n, *snapshot.re_cov.shape)))
    C[seen] = snapshot.condvar[rows[seen]]
    var = (
        np.einsum("ni,ij,nj->n", X, _layout(snapshot)[3], X)
        + np.einsum("ni,nij,nj->n", Z, C, Z)
        + snapshot.sigma**2
    )
    with np.errstate(invalid="ignore"):
        se = np.sqrt(np.where(var >= 0, var, np.nan))
    out = []
    for i in range(n):
        y, e, ok = float(yhat[i]), float(se[i]), bool(seen[i])
        out.append(
            {
                "group": keys[i],
                "prediction": y,
                "se": e,
                "lower": y - Z95 * e,
                "upper": y + Z95 * e,
                "group_seen": ok,
                "interval_kind": CONDITIONAL if ok else POPULATION,
            }
        )
    return out
