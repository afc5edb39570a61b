"""Compile every numba kernel once, into numba's on-disk cache: ``python -m streamlmm.warm``.

``scripts/setup`` runs it, so the first fit of a new process loads its kernels from the
cache in well under a second instead of compiling them, whatever the formula: the
passes over groups are compiled for q = 1, 2 and 3 random-effect columns (and one
version for any other q), with the number of fixed columns p an argument
(:func:`streamlmm.kernels._pass_kernels`), so no formula needs a compile of its own.

It runs the product's real paths on small data (learning one event and batches,
forgetting, weights, factors, predictions, fits, EM steps, snapshots and their merge,
the stream's decoder and the librdkafka gather) so that every kernel is compiled with
exactly the types those paths use. The work is split over two processes (a compile
uses one core). A second run finds everything cached and takes a few seconds.

Examples
--------
>>> sorted(TASKS)
['bayes', 'core_q1', 'core_q2', 'core_q3', 'core_qn', 'fetch', 'keys', 'stream']

"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

__all__ = ["main", "TASKS"]


def _frame(n: int, seed: int, k: int = 3):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    g = rng.integers(0, 12, n)
    X = pd.DataFrame({f"x{j + 1}": rng.normal(size=n) for j in range(k)})
    X["x"] = X["x1"]
    X["g"] = [f"g{i}" for i in g]
    X["f"] = rng.choice(["a", "b", "c"], n)
    X["ts"] = np.arange(n, dtype=float)
    y = pd.Series(1.0 + X["x1"] + 0.3 * g + rng.normal(size=n))
    return X, y


def _core(formula: str) -> None:
    """The model's paths for one formula (one q)."""
    import warnings

    import numpy as np
    import pandas as pd

    from streamlmm import MixedLM, Snapshot
    from streamlmm.checks import FitWarning

    warnings.simplefilter("ignore", FitWarning)
    X, y = _frame(300, 1)
    rows = X.to_dict("records")
    for kw in ({}, {"half_life": 50.0, "time_key": "ts"}, {"method": "ML"}):
        m = MixedLM(formula, **kw)
        for i, x in enumerate(rows[:150]):
            m.predict_one(x)
            m.learn_one(x, float(y.iloc[i]), w=2.0 if i % 7 == 0 else 1.0)
        m.learn_many(X.iloc[150:], y.iloc[150:])
        m.learn_many(X.iloc[:20].assign(g=np.arange(20)), y.iloc[:20])  # int keys
        m.learn_many(X.iloc[:20].astype({"g": "string"}), y.iloc[:20])  # pandas strings
        m.learn_many(X.iloc[:20].astype({"g": object}), y.iloc[:20], w=pd.Series(2.0, X.index[:20]))
        m.predict_many(X.iloc[:30])
        m.em_step()
        s = m.fit().snapshot(offsets={"t:0": 300})
        Snapshot.from_bytes(s.to_bytes())
    lv = {"f": ["a", "b", "c"]} if " f " in formula else None
    a, b = MixedLM(formula, levels=lv), MixedLM(formula, levels=lv)
    a.learn_many(X.iloc[:150], y.iloc[:150])
    b.learn_many(X.iloc[150:], y.iloc[150:])
    MixedLM.from_snapshots([a.snapshot(offsets={"t:0": 150}), b.snapshot(offsets={"t:1": 150})])


def _stream() -> None:
    """The engine on a small JSON-lines file: the decoder's scan, the key table, the
    coded learning path, checkpoints."""
    import json

    from streamlmm.stream.engine import Engine, EngineConfig

    X, y = _frame(2000, 2)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "events.jsonl")
        with open(path, "w") as fh:
            for r, v in zip(X.to_dict("records"), y):
                fh.write(json.dumps({**r, "y": float(v)}) + "\n")
            fh.write('{"g": "bad", "x": "nope", "y": 1}\n')
        for formula in ("y ~ x + (1 | g)", "y ~ x + f + (1 + x | g)"):
            cfg = EngineConfig(
                source=f"jsonl:{path}",
                formula=formula,
                snapshot_dir=os.path.join(d, "snap" + str(len(formula))),
                until_end=True,
                dead_letter=f"jsonl:{os.path.join(d, 'dead.jsonl')}",
                progress_seconds=1e9,
            )
            Engine(cfg).run(install_signals=False)


def _fetch() -> None:
    """The librdkafka gather, on message structs built in memory (as its tests do)."""
    import ctypes

    import numpy as np

    from streamlmm.stream import rdkafka

    n = 3
    structs = np.zeros((n, 9), np.int64)
    keep = []
    for r in range(n):
        arr = np.frombuffer(b'{"g": "a"}\x00', np.uint8)
        keep.append(arr)
        structs[r, 2], structs[r, 3], structs[r, 4], structs[r, 7] = 0, arr.ctypes.data, 10, r
    base = structs.ctypes.data
    msgs = (base + 72 * np.arange(n)).astype(np.uint64)
    ts = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)(lambda m, _: 0)
    destroy = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda m: None)
    addr = ctypes.cast
    rdkafka.collect(msgs, n, addr(ts, ctypes.c_void_p).value, addr(destroy, ctypes.c_void_p).value)


def _keys() -> None:
    """The key table's growth paths (rehashing when a batch brings many new keys)."""
    import numpy as np
    import pandas as pd

    from streamlmm import MixedLM

    n = 150_000
    rng = np.random.default_rng(3)
    X = pd.DataFrame({"x": rng.normal(size=n), "g": np.arange(n)})
    y = pd.Series(rng.normal(size=n))
    for keys in (X["g"], X["g"].astype(str), X["g"].astype(str).astype(object)):
        m = MixedLM("y ~ x + (1 | g)", reservoir=100)
        m.learn_many(X.assign(g=keys), y)


def _bayes() -> None:
    """The Bayesian paths (``MixedLM.sample`` and the posterior's group effects and
    predictive draws) for q = 1, 2, 3 and any other q: the log posterior's kernels and
    the C functions nutpie calls. Skipped when the ``bayes`` extra (nutpie, ArviZ) is
    not installed."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("nutpie") is None or importlib.util.find_spec("arviz") is None:
        print(
            "streamlmm.warm: nutpie/arviz not installed: Bayesian kernels skipped", file=sys.stderr
        )
        return
    from streamlmm import MixedLM, SamplingWarning

    warnings.simplefilter("ignore", SamplingWarning)
    X, y = _frame(300, 3)
    for formula in (
        "y ~ x + (1 | g)",
        "y ~ x + (1 + x | g)",
        "y ~ x1 + x2 + (1 + x1 + x2 | g)",
        "y ~ x1 + (1 + x1 + x2 + x3 | g)",
    ):
        m = MixedLM(formula)
        m.learn_many(X, y)
        priors = {"b": "normal(0, 5)", "sd": "normal(0, 2)", "sigma": "exponential(1)"}
        post = m.sample(priors, chains=2, draws=20, warmup=20, seed=1)
        post.ranef(post.keys[0])
        post.posterior_predictive(X.iloc[:5], draws=5)
        m.prior_predictive(X.iloc[:5], priors, draws=3)
        m.sample(priors, chains=1, draws=5, warmup=5, seed=1, backend="python", keep_ranef=True)


TASKS = {
    "core_q1": lambda: _core("y ~ x + (1 | g)"),
    "core_q2": lambda: _core("y ~ x + f + (1 + x | g)"),
    "core_q3": lambda: _core("y ~ x1 + x2 + (1 + x1 + x2 | g)"),
    "core_qn": lambda: _core("y ~ x1 + (1 + x1 + x2 + x3 | g)"),
    "stream": _stream,
    "fetch": _fetch,
    "keys": _keys,
    "bayes": _bayes,
}
# two lists of about equal compile time (measured): one per process
_SPLIT = (["core_q2", "core_qn", "fetch", "keys"], ["core_q1", "core_q3", "stream", "bayes"])


def _run(names: list[str]) -> None:
    for name in names:
        TASKS[name]()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m streamlmm.warm", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--tasks", help="comma-separated tasks to run in this process (internal)")
    ap.add_argument("--serial", action="store_true", help="one process instead of two")
    args = ap.parse_args(argv)
    if args.tasks:
        from streamlmm import compiling

        _run(args.tasks.split(","))
        print(len(compiling.compiled()))  # for the parent's count
        return 0
    t0 = time.perf_counter()
    from streamlmm import compiling

    if args.serial or (os.cpu_count() or 1) < 2:
        _run([n for part in _SPLIT for n in part])
        n = len(compiling.compiled())
    else:
        cmd = [sys.executable, "-m", "streamlmm.warm", "--tasks"]
        procs = [
            subprocess.Popen([*cmd, ",".join(part)], stdout=subprocess.PIPE, text=True)
            for part in _SPLIT
        ]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            print("streamlmm.warm: a compile failed (see above)", file=sys.stderr)
            return 1
        n = sum(int(o.split()[-1]) for o in outs)
    took = time.perf_counter() - t0
    print(f"streamlmm.warm: numba cache ready ({n} compiled; {took:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
