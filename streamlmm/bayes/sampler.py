"""The adapter to nutpie's NUTS: the log posterior handed over as a compiled C function.

nutpie (the PyMC team's NUTS, in Rust) calls a model's log density and gradient either
through a Python callback (``nutpie.compiled_pyfunc.from_pyfunc``) or through a compiled
C function whose address it is given (the path of its PyMC numba backend). streamlmm
takes the second path with its own functions: one numba ``cfunc`` per q (1, 2, 3 and
any other), compiled once per machine into numba's cache (``python -m
streamlmm.warm``), never per model. A model's data reach them through nutpie's
``user_data`` pointer, which points at eight integers: the addresses and sizes of the
arrays of :meth:`~streamlmm.bayes.density.LogPosterior.pack` and the dimension. So a
new model, a new stream position or new priors compile nothing.

The draw nutpie stores is the unconstrained point itself (another ``cfunc``: a copy);
the parameters are computed from the draws afterwards, vectorised
(:meth:`~streamlmm.bayes.density.LogPosterior.constrain`).

``backend="python"`` takes nutpie's Python-callback path instead (the same compiled
density, called from Python): slower per gradient, kept to measure the difference.

Chains are independent and reproducible from the seed: nutpie derives each chain's
random stream from the seed and the chain's index, whatever the number of cores. nutpie
takes initial positions (a function of a per-chain seed) and an initial step size, but
no initial mass matrix: a warm start (:func:`run` with ``init``) starts every chain at
a draw of the previous posterior with the previous step size, and can use a shorter
warm-up, while the (diagonal) mass matrix is adapted afresh.

"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from streamlmm.bayes import density

__all__ = ["SamplerSettings", "Run", "run", "nutpie_model", "c_logp", "BACKENDS"]

BACKENDS = ("compiled", "python")
_CF = {"cache": True, "nogil": True, "error_model": "numpy"}
_BLOCK = 64  # kernels.BLOCK, a literal here (the blocks' last dimension)


@intrinsic
def _voidptr(typingctx, addr):  # pragma: no cover - compiled
    """An integer address as a ``void*`` (what ``numba.carray`` reads from)."""
    sig = types.voidptr(addr)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


_LOGP_SIG = types.int64(
    types.uint64,
    types.CPointer(types.double),
    types.CPointer(types.double),
    types.CPointer(types.double),
    types.voidptr,
)
_EXPAND_SIG = types.int64(
    types.uint64,
    types.uint64,
    types.CPointer(types.double),
    types.CPointer(types.double),
    types.voidptr,
)


# user data: [addr Fb, blocks, entries, addr fd, len fd, addr ix, len ix, n_dim]
@njit(inline="always", **_CF)
def _finish(v, g, out):  # pragma: no cover - numba
    """Store the density; the code for nutpie: 0 fine, 4 a non-finite density, 3 a
    non-finite gradient. nutpie treats a positive code as a recoverable failure of the
    step (a divergence) and a negative one (-1: a wrong dimension) as fatal."""
    out[0] = v
    if not math.isfinite(v):
        return 4
    for i in range(g.shape[0]):
        if not math.isfinite(g[i]):
            return 3
    return 0


_k1, _k2, _k3, _kn = density.logp_q1, density.logp_q2, density.logp_q3, density.logp_qn


@cfunc(_LOGP_SIG, **_CF)
def c_logp_q1(dim, x_, g_, lp_, ud_):  # pragma: no cover - numba
    """nutpie's log density for q = 1: reads the model through the user data (see the
    module's text) and returns :func:`_finish`'s code."""
    ud = carray(ud_, (8,), dtype=np.int64)
    if dim != ud[7]:
        return -1
    Fb = carray(_voidptr(ud[0]), (ud[1], ud[2], _BLOCK), dtype=np.float64)
    fd = carray(_voidptr(ud[3]), (ud[4],), dtype=np.float64)
    ix = carray(_voidptr(ud[5]), (ud[6],), dtype=np.int64)
    g = carray(g_, (dim,))
    v = _k1(carray(x_, (dim,)), g, Fb, fd, ix)
    return _finish(v, g, carray(lp_, (1,)))


@cfunc(_LOGP_SIG, **_CF)
def c_logp_q2(dim, x_, g_, lp_, ud_):  # pragma: no cover - numba
    """nutpie's log density for q = 2."""
    ud = carray(ud_, (8,), dtype=np.int64)
    if dim != ud[7]:
        return -1
    Fb = carray(_voidptr(ud[0]), (ud[1], ud[2], _BLOCK), dtype=np.float64)
    fd = carray(_voidptr(ud[3]), (ud[4],), dtype=np.float64)
    ix = carray(_voidptr(ud[5]), (ud[6],), dtype=np.int64)
    g = carray(g_, (dim,))
    v = _k2(carray(x_, (dim,)), g, Fb, fd, ix)
    return _finish(v, g, carray(lp_, (1,)))


@cfunc(_LOGP_SIG, **_CF)
def c_logp_q3(dim, x_, g_, lp_, ud_):  # pragma: no cover - numba
    """nutpie's log density for q = 3."""
    ud = carray(ud_, (8,), dtype=np.int64)
    if dim != ud[7]:
        return -1
    Fb = carray(_voidptr(ud[0]), (ud[1], ud[2], _BLOCK), dtype=np.float64)
    fd = carray(_voidptr(ud[3]), (ud[4],), dtype=np.float64)
    ix = carray(_voidptr(ud[5]), (ud[6],), dtype=np.int64)
    g = carray(g_, (dim,))
    v = _k3(carray(x_, (dim,)), g, Fb, fd, ix)
    return _finish(v, g, carray(lp_, (1,)))


@cfunc(_LOGP_SIG, **_CF)
def c_logp_qn(dim, x_, g_, lp_, ud_):  # pragma: no cover - numba
    """nutpie's log density for any other q."""
    ud = carray(ud_, (8,), dtype=np.int64)
    if dim != ud[7]:
        return -1
    Fb = carray(_voidptr(ud[0]), (ud[1], ud[2], _BLOCK), dtype=np.float64)
    fd = carray(_voidptr(ud[3]), (ud[4],), dtype=np.float64)
    ix = carray(_voidptr(ud[5]), (ud[6],), dtype=np.int64)
    g = carray(g_, (dim,))
    v = _kn(carray(x_, (dim,)), g, Fb, fd, ix)
    return _finish(v, g, carray(lp_, (1,)))


@cfunc(_EXPAND_SIG, **_CF)
def c_expand(dim, n_out, x_, out_, ud_):  # pragma: no cover - numba
    """nutpie's expanded draw: the unconstrained point itself."""
    if n_out != dim:
        return -1
    x = carray(x_, (dim,))
    out = carray(out_, (n_out,))
    for i in range(dim):
        out[i] = x[i]
    return 0


C_LOGP = {1: c_logp_q1, 2: c_logp_q2, 3: c_logp_q3}


def c_logp(q: int):
    """The compiled C log density for ``q`` random-effect columns."""
    return C_LOGP.get(int(q), c_logp_qn)


# -- settings ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """What :func:`run` was asked to do (recorded in the posterior)."""

    chains: int = 4
    draws: int = 1000
    warmup: int = 1000
    seed: int = 0
    target_accept: float = 0.8
    max_depth: int = 10
    cores: int = 0  # 0: one per chain, up to the machine's cores
    backend: str = "compiled"
    warm_start: bool = False

    def __post_init__(self) -> None:
        for name in ("chains", "draws"):
            v = getattr(self, name)
            if not (isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.warmup, int | np.integer) and self.warmup >= 0):
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not (isinstance(self.seed, int | np.integer) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if not (isinstance(self.target_accept, float | int) and 0 < self.target_accept < 1):
            raise ValueError(f"target_accept must be in (0, 1), got {self.target_accept!r}")
        if not (isinstance(self.max_depth, int) and 1 <= self.max_depth <= 20):
            raise ValueError(f"max_depth must be an int in [1, 20], got {self.max_depth!r}")
        if not (isinstance(self.cores, int) and self.cores >= 0):
            raise ValueError(f"cores must be an int >= 0, got {self.cores!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (int(v) if isinstance(v, np.integer) else v) for k, v in vars(self).items()}


@dataclasses.dataclass(frozen=True)
class Run:
    """One sampler run: the unconstrained draws ``x`` (chains, draws, n_dim), the
    sampler's statistics per draw (``stats``: name → (chains, draws)), the last
    warm-up step size per chain, the seconds it took and the number of gradients
    (leapfrog steps, warm-up included) it evaluated."""

    x: np.ndarray
    stats: dict[str, np.ndarray]
    step_size: np.ndarray
    seconds: float
    settings: SamplerSettings
    n_grad: int = 0


STATS = {
    "diverging": "diverging",
    "tree_depth": "depth",
    "maxdepth_reached": "maxdepth_reached",
    "step_size": "step_size",
    "energy": "energy",
    "n_steps": "n_steps",
    "lp": "logp",
    "acceptance": "mean_tree_accept",
}


# -- the model handed to nutpie --------------------------------------------------------------------
def nutpie_model(lp: density.LogPosterior, backend: str = "compiled", init=None):
    """nutpie's compiled model of ``lp``. ``init(seed) -> x`` gives each chain's initial
    point (``None``: uniform on (−2, 2) in the unconstrained coordinates, as Stan)."""
    import nutpie  # noqa: F401  (fails early with a clear ImportError)

    n = lp.n_dim
    Fb, fd, ix = lp.pack()
    if init is None:

        def init(seed):
            """Stan's default: uniform on (−2, 2) in the unconstrained coordinates."""
            rng = np.random.default_rng(seed)
            return rng.uniform(-2.0, 2.0, n)

    if backend == "python":
        from nutpie.compiled_pyfunc import from_pyfunc

        kernel = density.logp_kernel(lp.q)

        def make_logp():
            def logp(x):
                g = np.empty(n)
                v = kernel(np.ascontiguousarray(x, dtype=float), g, Fb, fd, ix)
                return float(v), g

            return logp

        def make_expand(seed1, seed2, chain):
            def expand(x):
                return {"x": np.array(x, dtype=float)}

            return expand

        return from_pyfunc(
            n,
            make_logp,
            make_expand,
            [np.dtype("float64")],
            [(n,)],
            ["x"],
            make_initial_point_fn=init,
        )
    from nutpie.compile_pymc import CompiledPyMCModel

    ud = np.array(
        [
            Fb.ctypes.data,
            Fb.shape[0],
            Fb.shape[1],
            fd.ctypes.data,
            fd.shape[0],
            ix.ctypes.data,
            ix.shape[0],
            n,
        ],
        dtype=np.int64,
    )
    keep = (Fb, fd, ix)  # the arrays the pointers point into live as long as the model
    return CompiledPyMCModel(
        dims={"x": ("unconstrained",)},
        _n_dim=n,
        _shapes={"x": (n,)},
        _coords={"unconstrained": np.arange(n)},
        compiled_logp_func=c_logp(lp.q),
        compiled_expand_func=c_expand,
        initial_point_func=init,
        shared_data={"keep": keep},
        shared_var_keys={},
        user_data=ud,
        n_expanded=n,
        shape_info=(["x"], [slice(0, n)], [(n,)]),
        logp_func=None,
        expand_func=None,
    )


def run(
    lp: density.LogPosterior,
    settings: SamplerSettings,
    *,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Callable[[Any], None] | None = None,
) -> Run:
    """Sample ``lp`` with nutpie's NUTS.

    ``init = (draws, step sizes)`` warm-starts: each chain starts at one of ``draws``
    (unconstrained points, rows) chosen from its seed, with the median of the step
    sizes as nutpie's initial step size. ``progress`` receives nutpie's per-chain
    progress (``nutpie.ChainProgress`` list) every half second.
    """
    import nutpie

    n = lp.n_dim
    init_fn = None
    kw: dict[str, Any] = {}
    if init is not None:
        pool = np.ascontiguousarray(init[0], dtype=float).reshape(-1, n)

        def init_fn(seed):
            rng = np.random.default_rng(seed)
            return pool[int(rng.integers(pool.shape[0]))].copy()

        step = float(np.median(init[1]))
        if math.isfinite(step) and step > 0:
            kw["initial_step"] = step
    model = nutpie_model(lp, settings.backend, init_fn)
    cores = settings.cores or min(settings.chains, os.cpu_count() or 1)
    t0 = time.perf_counter()
    trace = nutpie.sample(
        model,
        draws=settings.draws,
        tune=settings.warmup,
        chains=settings.chains,
        cores=cores,
        seed=int(settings.seed),
        progress_bar=False,
        save_warmup=True,
        target_accept=settings.target_accept,
        maxdepth=settings.max_depth,
        progress_callback=progress,
        progress_rate=500,
        **kw,
    )
    seconds = time.perf_counter() - t0
    x = np.asarray(trace["posterior"]["x"].values, dtype=float)
    ss = trace["sample_stats"]
    stats = {k: np.asarray(ss[v].values) for k, v in STATS.items() if v in ss}
    wss = trace["warmup_sample_stats"] if settings.warmup else None
    n_grad = int(np.sum(stats["n_steps"]))
    if wss is not None and "step_size" in wss:
        step = np.asarray(wss["step_size"].values)[:, -1]
        n_grad += int(np.sum(np.asarray(wss["n_steps"].values)))
    else:
        step = stats["step_size"][:, 0]
    return Run(
        x=x,
        stats=stats,
        step_size=np.asarray(step, float),
        seconds=seconds,
        settings=settings,
        n_grad=n_grad,
    )
