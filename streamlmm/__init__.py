"""streamlmm: exact linear mixed-effects models (lme4's REML/ML) on event streams."""

from __future__ import annotations

from streamlmm.formula import Formula, parse_formula
from streamlmm.model import MixedLM
from streamlmm.snapshot import Snapshot, SnapshotError
from streamlmm.store import LocalStore

__all__ = ["MixedLM", "Snapshot", "SnapshotError", "LocalStore", "Formula", "parse_formula"]
__version__ = "0.1.0"
