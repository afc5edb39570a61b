"""First use: no formula compiles kernels of its own, and a compile is never silent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from streamlmm import compiling, kernels

NEW_SHAPES = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pandas as pd
    from streamlmm import MixedLM, compiling
    rng = np.random.default_rng(3)
    n = 400
    X = pd.DataFrame({f"x{j}": rng.normal(size=n) for j in range(1, 8)})
    X["g"] = rng.integers(0, 20, n)
    X["f"] = rng.choice([f"l{i}" for i in range(11)], n)
    y = pd.Series(rng.normal(size=n) + X["g"] * 0.1)
    formulas = [  # shapes no other test fits: q = 1, 2, 3, 4 and p up to 19
        "y ~ x1 + x2 + x3 + x4 + x5 + x6 + x7 + f + (1 | g)",
        "y ~ x1 * x2 + I(x3^2) + f + (1 + x2 | g)",
        "y ~ x1 + x2 + x3 + x4 + f + (1 + x1 + x2 | g)",
        "y ~ x1 + (1 + x1 + x2 + x3 | g)",
    ]
    ps = []
    for formula in formulas:
        m = MixedLM(formula)
        m.learn_many(X, y)
        for row in X.iloc[:5].to_dict("records"):
            m.learn_one(row, 1.0)
            m.predict_one(row)
        m.fit().em_step()
        ps.append(len(m.snapshot().fixef))
    print(json.dumps({"p": ps, "compiled": compiling.compiled()}))
    """
)


def test_new_formula_shapes_compile_nothing():
    """Kernels are compiled once per machine (``python -m streamlmm.warm``, run by
    ``scripts/setup``), not per formula: a new process fitting shapes that nothing fitted
    before loads every kernel from the cache. (Before, the passes were compiled per
    (q, p): each of these shapes compiled for 15-50 s.)"""
    out = subprocess.run(
        [sys.executable, "-c", NEW_SHAPES], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["p"] == [18, 15, 15, 2]
    assert got["compiled"] == [], (
        f"kernels compiled in a new process: {got['compiled']} "
        "(is the numba cache current? run `python -m streamlmm.warm`)"
    )


def test_a_compile_is_announced_in_one_line(tmp_path):
    """With an empty cache, the first call of a kernel compiles it and says so once, in
    the log; loading it from the cache says nothing."""
    code = textwrap.dedent(
        """
        import numpy as np
        from streamlmm import kernels, compiling
        seen = []
        compiling.on_compile(seen.append)
        kernels.first_overflow(np.zeros((2, 2)), np.zeros(2), np.ones(2), np.arange(2), 1.0)
        print(len(seen), len(compiling.compiled()))
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        for _ in range(2)
    ]
    first, second = runs
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    lines = [ln for ln in first.stderr.splitlines() if "compiling streamlmm's numba kernel" in ln]
    assert len(lines) == 1 and "kernels.first_overflow" in lines[0]
    assert first.stdout.split() == ["1", "1"]
    assert "compiling" not in second.stderr and second.stdout.split() == ["0", "0"]


def test_load_cached_loads_without_compiling():
    """``load_cached`` brings cached compilations in without calling (or compiling)."""
    k = kernels._pass_kernels(2)
    kernels.pls_sums(np.zeros((1, 4 + 2 + 2)), 2, 1, np.eye(2), False)  # surely cached now
    before = len(compiling.compiled())
    compiling.load_cached(*k)
    assert len(k.evaluate.overloads) >= 1
    assert len(compiling.compiled()) == before


def test_the_engine_says_a_compile_in_its_progress_output(tmp_path):
    """``streamlmm run`` with an empty numba cache: each compile is one line in the
    progress output (``[streamlmm] compiling ...``) besides the log's."""
    src = tmp_path / "e.jsonl"
    src.write_text(
        "".join(
            json.dumps({"g": f"g{i % 5}", "x": float(i % 7), "y": float(i % 11)}) + "\n"
            for i in range(60)
        )
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "streamlmm", "run", "--source", f"jsonl:{src}"]
        + ["--formula", "y ~ x + (1 | g)", "--snapshot-dir", str(tmp_path / "s"), "--until-end"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    said = [ln for ln in out.stderr.splitlines() if ln.startswith("[streamlmm] compiling")]
    assert said and all("streamlmm's numba kernel" in ln for ln in said)
