#!/usr/bin/env bash
# Create the peers' virtual environment for scripts/bench_bayes_peers.py, outside the repo:
# PyMC, nutpie (numba backend) and ArviZ are no dependency of streamlmm.
#
#   scripts/bench_bayes_peers.sh            # creates $PEERS_VENV (default /work/peers-venv)
#   $PEERS_VENV/bin/python scripts/bench_bayes_peers.py DATA --formula "..."
#
# Python >= 3.12 (nutpie >= 0.16.9, PyMC >= 6 and ArviZ >= 1.0 need it): $PYTHON, else
# python3.12/python3.13 on PATH, else pyenv's. brms needs R from Debian:
#   apt-get install r-base-core r-cran-brms r-cran-rstan
# Idempotent: a second run only reports the versions.
set -euo pipefail
VENV="${PEERS_VENV:-/work/peers-venv}"

ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
find_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    for c in python3.12 python3.13 python3; do
        if command -v "$c" >/dev/null 2>&1 && ok "$c"; then command -v "$c"; return; fi
    done
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    for c in "$root"/versions/3.12*/bin/python3 "$root"/versions/3.13*/bin/python3; do
        if [ -x "$c" ] && ok "$c"; then echo "$c"; return; fi
    done
    echo "bench_bayes_peers.sh: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
    exit 2
}

if [ ! -x "$VENV/bin/python" ]; then
    "$(find_python)" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import pymc, nutpie, arviz, numba' >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet pymc nutpie arviz numba pandas
fi
"$VENV/bin/python" - <<'PY'
import sys, arviz, numba, nutpie, pymc, pytensor
print(f"Python {sys.version.split()[0]}: pymc {pymc.__version__}, pytensor {pytensor.__version__}, "
      f"nutpie {nutpie.__version__}, arviz {arviz.__version__}, numba {numba.__version__}")
PY
