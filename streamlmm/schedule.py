"""The refresh schedule: when a streaming model refits, takes an EM step, or does nothing.

Learning only accumulates statistics; parameters are refreshed lazily, when a prediction
or a snapshot needs them (docs/design.md §3). The schedule is driven by cost: an exact,
warm-started refit when its estimated cost, spread over the events since the last one,
fits ``refresh_budget`` microseconds per event, and whenever the stream has doubled (so
a young stream refits at 1, 2, 4, … events); an ML-EM step in between when its cost fits
half the budget. Costs come from a deterministic model of the work (passes over the
groups × (overhead + per-group cost)), not from the clock, so two identical streams
refresh identically (river's checks and the bitwise ``learn_one`` ≡ ``learn_many``
tests rely on it). ``refit_every`` / ``em_every`` fix the counts instead.

Examples
--------
>>> s = Schedule()
>>> s.due(1), s.due(0)
('refit', None)
>>> s.refitted(1, passes=3, ok=True, n_groups=50, q=1, p=2)
>>> s.next_refit, s.due(2)
(2, 'refit')

"""

from __future__ import annotations

import math

__all__ = [
    "Schedule",
    "pass_cost_ratio",
    "REFRESH_BUDGET_US",
    "SCHEDULED_REFIT_EVALS",
    "SCHEDULED_REFIT_US",
    "PASS_COST_US",
    "EM_PASS_COST_US",
]

# A scheduled refit (inside predict_one/snapshot) stops after this many passes and
# continues warm at the next one, so no single call stalls; fit() itself runs to the end.
SCHEDULED_REFIT_EVALS = 12
# ... and at most about this much estimated work (µs; the cost model below), but never
# fewer passes than one Newton step needs (the gradient and a differenced Hessian)
SCHEDULED_REFIT_US = 8_000.0
# The schedule's cost model, µs per pass over the groups: overhead + per group. Measured
# on the benchmark machine (scripts/bench_core.py); only the schedule depends on it.
PASS_COST_US = (150.0, 0.1)
EM_PASS_COST_US = (400.0, 0.25)  # a whole em_step(): set-up, two profiles, adopt
REFRESH_BUDGET_US = 100.0  # default refresh_budget: µs of refresh work per event, amortised


def pass_cost_ratio(q: int, p: int) -> float:
    """A pass's cost per group relative to the benchmark model's (q = 2, p = 3), at least 1.

    The pass's per-group work is the q×q factor (q³), the q×(p+1) solves (q²(p+1)) and the
    gradient's Gram sums over ``m = q(p+1)`` entries (m², which dominates for large p);
    the weights were fitted to ``scripts/bench_core.py``-style timings of the pass at
    20k groups (q = 1-3, p = 2-19). Smaller models keep the benchmark's cost, so their
    schedule is as before.

    >>> pass_cost_ratio(2, 3), round(pass_cost_ratio(3, 19), 1)
    (1.0, 8.9)

    """
    m = q * (p + 1)
    per_group = 5.0 + 0.13 * m * m + 8.0 * q**3
    return max(1.0, per_group / (5.0 + 0.13 * 64 + 64.0))


class Schedule:
    """When the next refit and EM step are due, in events (see the module's text).

    Parameters
    ----------
    refresh_budget
        Microseconds of refresh work per event, amortised.
    em_every, refit_every
        Fixed event counts between EM steps / refits instead (``None``: the budget).
    """

    def __init__(
        self,
        refresh_budget: float = REFRESH_BUDGET_US,
        em_every: int | None = None,
        refit_every: int | None = None,
    ):
        for name, v in (("em_every", em_every), ("refit_every", refit_every)):
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not (isinstance(refresh_budget, (int, float)) and refresh_budget > 0):
            raise ValueError(f"refresh_budget must be a positive number, got {refresh_budget!r}")
        self.refresh_budget = refresh_budget
        self.em_every = em_every
        self.refit_every = refit_every
        self.next_refit = 1
        self.next_em = math.inf
        self.refreshed_at = -1

    @property
    def horizon(self) -> float:
        """The event count at which the next refresh of either kind is due."""
        return min(self.next_refit, self.next_em)

    def due(self, n: int) -> str | None:
        """``"refit"``, ``"em"`` or ``None`` at event count ``n`` (refits first)."""
        if n == self.refreshed_at or n == 0:
            return None
        if n >= self.next_refit:
            return "refit"
        if n >= self.next_em:
            return "em"
        return None

    @staticmethod
    def pass_us(n_groups: int, q: int, p: int, cost: tuple[float, float] = PASS_COST_US) -> float:
        """Estimated µs of one pass over ``n_groups`` groups: overhead + per group, the
        per-group cost scaled by :func:`pass_cost_ratio` for models larger than the
        benchmark's."""
        return cost[0] + cost[1] * pass_cost_ratio(q, p) * n_groups

    def _gap(self, passes: int, cost, share: float, fixed, n_groups: int, q: int, p: int) -> int:
        """Events until the next refresh of a kind: ``fixed`` if set, else until the
        estimated cost (µs) of this one, spread over them, fits ``share`` of the budget."""
        if fixed is not None:
            return fixed
        us = passes * self.pass_us(n_groups, q, p, cost)
        return max(1, math.ceil(us / (share * self.refresh_budget)))

    def scheduled_evals(self, n_groups: int, q: int, p: int, n_theta: int) -> int:
        """Passes a scheduled refit may take in one call: :data:`SCHEDULED_REFIT_EVALS`,
        fewer where passes are dear (:data:`SCHEDULED_REFIT_US`), never fewer than one
        Newton step needs. The count comes from the cost model, not the clock."""
        fit = int(SCHEDULED_REFIT_US // self.pass_us(n_groups, q, p))
        return max(n_theta + 2, min(SCHEDULED_REFIT_EVALS, fit))

    def refitted(self, n: int, passes: int, ok: bool, n_groups: int, q: int, p: int) -> None:
        """A refit at event count ``n`` took ``passes`` passes: when the next ones are due."""
        gap = self._gap(passes, PASS_COST_US, 1.0, self.refit_every, n_groups, q, p) if ok else 1
        if self.refit_every is None:  # and whenever the stream has doubled (a young one)
            gap = min(gap, max(n, 1))
        self.next_refit = n + gap
        self.next_em = n + self._gap(1, EM_PASS_COST_US, 0.5, self.em_every, n_groups, q, p)
        self.refreshed_at = n

    def em_stepped(self, n: int, n_groups: int, q: int, p: int) -> None:
        """An EM step at event count ``n``: when the next one is due."""
        self.next_em = n + self._gap(1, EM_PASS_COST_US, 0.5, self.em_every, n_groups, q, p)
        self.refreshed_at = n

    def resumed(self, n: int, have_params: bool, n_groups: int, q: int, p: int) -> None:
        """A model resumed at event count ``n`` (from a snapshot's state): a warm refit
        (about 20 passes) when parameters came with it, else one at the next event."""
        self.refreshed_at = n
        warm = self._gap(20, PASS_COST_US, 1.0, self.refit_every, n_groups, q, p)
        self.next_refit = n + (warm if have_params else 1)
        self.next_em = n + self._gap(1, EM_PASS_COST_US, 0.5, self.em_every, n_groups, q, p)

    def to_state(self) -> dict:
        return {
            "refresh_budget": self.refresh_budget,
            "em_every": self.em_every,
            "refit_every": self.refit_every,
        }
