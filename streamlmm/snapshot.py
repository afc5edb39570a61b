"""Snapshot: immutable results of a fit, and their (de)serialisation.

A snapshot holds everything a reader needs to answer lookups (fixed effects, variance
components, every group's BLUP and conditional covariance) and, optionally, the exact
state that produced it (the packed statistics and θ), so that an engine can resume
from it. It also records the source offsets its statistics include.

The byte format is self-describing and checksummed; it contains no pickle::

    b"SLMMSNAP" | u32 version | u64 header length | header (JSON) | arrays | sha256

"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from streamlmm.formula import parse_formula
from streamlmm.keys import check_fallback, check_key, unknown_group
from streamlmm.values import count_text

__all__ = ["Snapshot", "SnapshotError", "FORMAT_VERSION"]

MAGIC = b"SLMMSNAP"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<8sIQ")
_MAX_HEADER = 1 << 31


class SnapshotError(ValueError):
    """A snapshot's bytes are corrupt, truncated or of an unknown format."""


# -- the container: magic | u32 version | u64 header length | JSON header | arrays | sha256
def _lay_out(arrays: Mapping[str, np.ndarray]) -> tuple[list[dict], list[bytes]]:
    """The arrays as little-endian float64 blobs, and their layout for the header."""
    layout, blobs, offset = [], [], 0
    for name, a in arrays.items():
        a = np.asarray(a)
        data = np.ascontiguousarray(a, dtype="<f8").tobytes()
        layout.append({"name": name, "shape": list(a.shape), "offset": offset})
        blobs.append(data)
        offset += len(data)
    return layout, blobs


def _seal(magic: bytes, version: int, header: dict, blobs: list[bytes]) -> bytes:
    hbytes = json.dumps(header, allow_nan=True, separators=(",", ":")).encode()
    body = _PREFIX.pack(magic, version, len(hbytes)) + hbytes + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def seal_container(magic: bytes, version: int, header: dict, arrays: Mapping) -> bytes:
    """Bytes of a checksummed container (the snapshot format, no pickle): ``header`` as
    JSON (it gains an ``arrays`` layout) and ``arrays`` as float64 blobs. Used by
    snapshots and by posteriors (:mod:`streamlmm.bayes.posterior`)."""
    layout, blobs = _lay_out(arrays)
    return _seal(magic, version, {**header, "arrays": layout}, blobs)


def open_container(
    data: bytes, magic: bytes, version: int, what: str = "snapshot"
) -> tuple[dict, dict[str, np.ndarray]]:
    """Verify and parse :func:`seal_container`'s bytes: ``(header, arrays)`` (the arrays
    are read-only views of ``data``). ``SnapshotError`` names what is wrong."""
    if len(data) < _PREFIX.size + 32:
        raise SnapshotError(f"{what} truncated")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError(f"{what} checksum mismatch (corrupt or partial file)")
    got, v, hlen = _PREFIX.unpack_from(body)
    if got != magic:
        raise SnapshotError(f"not a streamlmm {what}")
    if v != version:
        raise SnapshotError(f"{what} format version {v} is not {version}")
    if hlen > _MAX_HEADER or _PREFIX.size + hlen > len(body):
        raise SnapshotError(f"{what} header length out of range")
    try:
        h = json.loads(body[_PREFIX.size : _PREFIX.size + hlen])
        base = _PREFIX.size + hlen
        arrays = {}
        for a in h["arrays"]:
            count = math.prod(a["shape"])
            arrays[a["name"]] = np.frombuffer(
                body, dtype="<f8", count=count, offset=base + a["offset"]
            ).reshape(a["shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{what} header is malformed: {e}") from e
    return h, arrays


def _frozen(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray) and a.dtype == np.float64 and not a.flags.writeable:
        root = a
        while isinstance(root, np.ndarray):
            root = root.base
        if isinstance(root, bytes):  # a view of immutable bytes (from_bytes): no copy
            return a
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


class Snapshot:
    """Immutable estimates of a mixed model at one moment of a stream.

    The attribute names follow lme4: ``fixef``, ``fixef_se`` (``summary()``'s standard
    errors), ``re_cov`` (``VarCorr``: σ²ΛΛ'), ``sigma``, ``theta``
    (``getME(m, "theta")``), ``criterion`` (``REMLcrit()`` or ``deviance()``).
    Per group (rows in ``keys`` order): ``b`` and ``condvar`` (``ranef(condVar =
    TRUE)``), ``b_np`` and ``b_np_se`` (the group's own estimate of its effect from its
    data alone at ``fixef``, no pooling, NaN where its data do not identify it;
    docs/math.md §4), ``group_n`` and ``group_ybar``.

    Examples
    --------
    >>> from streamlmm import MixedLM
    >>> m = MixedLM("y ~ x + (1 | g)")
    >>> for i in range(40):
    ...     m.learn_one({"g": i % 4, "x": float(i % 7)}, 2.0 * (i % 7) + (i % 4) + 0.1 * (i % 3))
    >>> s = m.fit().snapshot()
    >>> round(s.fixef["x"], 2), s.n_groups, s.n_obs
    (2.0, 4, 40.0)
    >>> round(s.ranef(3)["(Intercept)"], 2)
    1.49
    >>> s.ranef(99)
    Traceback (most recent call last):
    ...
    streamlmm.keys.UnknownGroupError: unknown group 99: not among the 4 groups (pass ...
    >>> s.ranef(99, fallback="population"), 99 in s, 3 in s
    ({'(Intercept)': 0.0}, False, True)
    >>> Snapshot.from_bytes(s.to_bytes()).fixef == s.fixef
    True

    """

    __slots__ = (
        "formula",
        "method",
        "fixef",
        "fixef_se",
        "re_names",
        "re_cov",
        "sigma",
        "theta",
        "criterion",
        "n_obs",
        "n_groups",
        "singular",
        "converged",
        "n_events",
        "group_n",
        "group_ybar",
        "fixef_vcov",
        "dropped",
        "warnings",
        "optinfo",
        "history",
        "resid_quantiles",
        "offsets",
        "meta",
        "keys",
        "b",
        "condvar",
        "b_np",
        "b_np_se",
        "state",
        "design",
        "_index",
        "_formula",
        "_design",
    )

    def __init__(
        self,
        *,
        formula: str,
        method: str,
        fixef: Mapping[str, float],
        fixef_se: Mapping[str, float],
        re_cov,
        sigma: float,
        theta,
        criterion: float,
        n_obs: float,
        singular: bool,
        converged: bool,
        n_events: int,
        keys,
        b,
        condvar,
        group_n=None,
        group_ybar=None,
        b_np=None,
        b_np_se=None,
        fixef_vcov=None,
        re_names=None,
        dropped=(),
        warnings=(),
        optinfo: Mapping[str, Any] | None = None,
        history=(),
        resid_quantiles: Mapping[str, float] | None = None,
        offsets: Mapping[str, int] | None = None,
        meta: Mapping[str, Any] | None = None,
        state: Mapping[str, Any] | None = None,
        design: Mapping[str, Any] | None = None,
    ):
        f = parse_formula(formula)
        put = object.__setattr__
        put(self, "_formula", f)
        put(self, "formula", formula)
        put(self, "method", method)
        put(self, "fixef", MappingProxyType({k: float(v) for k, v in fixef.items()}))
        put(self, "fixef_se", MappingProxyType({k: float(v) for k, v in fixef_se.items()}))
        if re_names is None:  # random columns are numeric: known from the formula alone
            from streamlmm.design import numeric_design

            re_names = numeric_design(f).random
        put(self, "re_names", tuple(re_names))
        put(self, "design", MappingProxyType(dict(design)) if design is not None else None)
        put(self, "_design", None)
        put(self, "sigma", float(sigma))
        put(self, "theta", _frozen(theta).reshape(-1))
        put(self, "criterion", float(criterion))
        put(self, "n_obs", float(n_obs))
        put(self, "singular", bool(singular))
        put(self, "converged", bool(converged))
        put(self, "n_events", int(n_events))
        put(self, "keys", tuple(keys))
        put(self, "n_groups", len(self.keys))
        q = len(self.re_names)
        put(self, "re_cov", _frozen(re_cov).reshape(q, q))
        put(self, "b", _frozen(b).reshape(len(self.keys), q))
        put(self, "condvar", _frozen(condvar).reshape(len(self.keys), q, q))
        for name, v in (("b_np", b_np), ("b_np_se", b_np_se)):
            v = np.full((len(self.keys), q), np.nan) if v is None else v
            put(self, name, _frozen(v).reshape(len(self.keys), q))
        if group_n is None:
            group_n = np.full(len(self.keys), np.nan)
        put(self, "group_n", _frozen(group_n).reshape(len(self.keys)))
        if group_ybar is None:
            group_ybar = np.full(len(self.keys), np.nan)
        put(self, "group_ybar", _frozen(group_ybar).reshape(len(self.keys)))
        p = len(self.fixef)
        if fixef_vcov is None:
            fixef_vcov = np.diag([v**2 for v in self.fixef_se.values()])
        put(self, "fixef_vcov", _frozen(fixef_vcov).reshape(p, p))
        put(self, "dropped", tuple(dropped))
        put(self, "warnings", tuple(warnings))
        put(self, "optinfo", MappingProxyType(dict(optinfo or {})))
        put(self, "history", tuple(MappingProxyType(dict(h)) for h in history))
        put(self, "resid_quantiles", MappingProxyType(dict(resid_quantiles or {})))
        put(self, "offsets", MappingProxyType(dict(offsets or {})))
        put(self, "meta", MappingProxyType(dict(meta or {})))
        frozen_state = None
        if state is not None:
            frozen_state = MappingProxyType(
                {k: _frozen(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}
            )
        put(self, "state", frozen_state)
        put(self, "_index", dict(zip(self.keys, range(len(self.keys)))))

    def __setattr__(self, name, value):
        raise AttributeError("Snapshot is immutable")

    def __delattr__(self, name):
        raise AttributeError("Snapshot is immutable")

    def __repr__(self) -> str:
        fx = ", ".join(f"{k}={v:.6g}" for k, v in self.fixef.items())
        return (
            f"Snapshot({self.formula!r}, {self.method}, n_obs={count_text(self.n_obs)}, "
            f"n_groups={self.n_groups}, sigma={self.sigma:.6g}, fixef: {fx})"
        )

    # -- lookups ------------------------------------------------------------------------
    def _row(self, key) -> int:
        """The row of group ``key``; -1 if the snapshot has no such group (also for a
        value that is no group key). A stored key is found as it is, so that a key
        stored before a rule refused it (a lone surrogate) is still found."""
        if type(key) is not int and type(key) is not str:
            try:
                key = check_key(key)  # np.int64(3) and 3.0 name the group 3
            except ValueError:
                return -1
        return self._index.get(key, -1)

    def _found(self, key, fallback: str | None) -> int:
        """:meth:`_row` of a lookup: an unseen group is an :class:`UnknownGroupError`
        unless ``fallback="population"``, then -1."""
        r = self._row(key)
        if r < 0 and not check_fallback(fallback):
            raise unknown_group(key, self._index, self.n_groups)
        return r

    def __contains__(self, key) -> bool:
        """Whether the snapshot has group ``key`` (``"H017" in snap``)."""
        return self._row(key) >= 0

    def ranef(self, key, *, fallback: str | None = None) -> dict[str, float]:
        """The group's BLUP ``b̂_g`` by random-effect name (lme4's ``ranef()`` row).

        An unseen group raises :class:`~streamlmm.keys.UnknownGroupError` (a
        ``KeyError`` naming the key; the int 17 and the string ``"17"`` are different
        groups, and the message says so when the other one exists). With
        ``fallback="population"`` an unseen group gets the population's values instead:
        here zeros, the mean of the random effects.
        """
        r = self._found(key, fallback)
        vals = self.b[r] if r >= 0 else np.zeros(len(self.re_names))
        return dict(zip(self.re_names, map(float, vals)))

    def ranef_cov(self, key, *, fallback: str | None = None) -> np.ndarray:
        """The group's conditional covariance (lme4 ``condVar``); for an unseen group
        with ``fallback="population"``, the prior ``re_cov`` (see :meth:`ranef`)."""
        r = self._found(key, fallback)
        return self.condvar[r] if r >= 0 else self.re_cov

    def n(self, key, *, fallback: str | None = None) -> float:
        """The group's total frequency weight Σw (decayed, under forgetting); 0 for an
        unseen group with ``fallback="population"`` (see :meth:`ranef`)."""
        r = self._found(key, fallback)
        return float(self.group_n[r]) if r >= 0 else 0.0

    def shrinkage(self, key, *, fallback: str | None = None) -> dict[str, float]:
        """Per random effect, the share of the prior variance the group's data explains:
        ``1 − condVar_ii / re_cov_ii``.

        For a random intercept this is the classical factor ``τ²/(τ² + σ²/n_g)``: close
        to 1 for a large group (its own mean), and 0 for an unseen group with
        ``fallback="population"`` (its effect is the prior's, shrunk all the way to 0;
        see :meth:`ranef`). A zero prior variance gives 0.
        """
        cv = np.diagonal(self.ranef_cov(key, fallback=fallback))
        prior = np.diagonal(self.re_cov)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(prior > 0, 1.0 - cv / prior, 0.0)
        return dict(zip(self.re_names, map(float, f)))

    def predict(self, x: Mapping[str, Any]) -> float:
        """Fixed part plus the group's BLUP; for an unseen group (or none given) the
        fixed part alone, the population's prediction, as ``MixedLM.predict_one`` and
        lme4's ``predict(..., allow.new.levels = TRUE)`` give.

        ``x`` is an event as learned (factors as strings, raw fields of transforms);
        missing features raise ``ValueError`` naming the field; a factor level the model
        never saw has effect 0 (the reference level's). Dropped (aliased) columns
        contribute nothing. The formula is the one of every prediction
        (:func:`streamlmm.predictor.coefficients`).
        """
        from streamlmm.predictor import coefficients, linear_predictor

        d = self._encoder()
        try:
            a = d.encode_one(x, np.empty(max(d.k, 1)), learn=False)
        except ValueError as e:  # Missing included
            raise ValueError(str(e)) from None
        r = self._row(x.get(self._formula.group))
        b = self.b[r] if r >= 0 else None
        coef = coefficients(d.k, d.xi, list(self.fixef.values()), d.zi, b)
        return linear_predictor(a, coef)

    def _encoder(self):
        """The formula's encoder at this snapshot's factor levels (built once)."""
        if self._design is None:
            from streamlmm.design import Design, numeric_design

            d = (  # a snapshot made without a design has numeric columns only
                Design.from_state(self.formula, self.design)
                if self.design is not None
                else numeric_design(self.formula)
            )
            object.__setattr__(self, "_design", d)
        return self._design

    def to_dict(self, *, groups: bool = False) -> dict[str, Any]:
        """JSON-ready global estimates (and every group's effects when ``groups``)."""
        out: dict[str, Any] = {
            "formula": self.formula,
            "method": self.method,
            "fixef": dict(self.fixef),
            "fixef_se": dict(self.fixef_se),
            "re_names": list(self.re_names),
            "re_cov": self.re_cov.tolist(),
            "sigma": self.sigma,
            "theta": self.theta.tolist(),
            "criterion": self.criterion,
            "n_obs": self.n_obs,
            "n_groups": self.n_groups,
            "n_events": self.n_events,
            "singular": self.singular,
            "converged": self.converged,
            "offsets": dict(self.offsets),
            "meta": dict(self.meta),
        }
        out.update(
            n_groups=self.n_groups,
            dropped=list(self.dropped),
            warnings=list(self.warnings),
            optinfo=dict(self.optinfo),
            history=[dict(h) for h in self.history],
            resid_quantiles=dict(self.resid_quantiles),
        )
        if groups:  # a list, so that the int 1 and the string "1" stay two groups
            out["groups"] = [
                {"group": k, "n": float(self.group_n[i]), "ranef": self.ranef_row(i)}
                for i, k in enumerate(self.keys)
            ]
        return out

    def ranef_row(self, r: int) -> dict[str, float]:
        """Row ``r``'s BLUP by random-effect name."""
        return dict(zip(self.re_names, map(float, self.b[r])))

    # -- bytes --------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "b": self.b,
            "condvar": self.condvar,
            "b_np": self.b_np,
            "b_np_se": self.b_np_se,
            "group_n": self.group_n,
            "group_ybar": self.group_ybar,
            "fixef_vcov": self.fixef_vcov,
        }
        for k, v in (self.state or {}).items():
            if isinstance(v, np.ndarray):
                arrays[f"state.{k}"] = v
        return arrays

    def to_bytes(self) -> bytes:
        """Serialise to the checksummed snapshot format (no pickle)."""
        header = self.to_dict()
        header["keys"] = list(self.keys)
        header["state"] = {
            k: v for k, v in (self.state or {}).items() if not isinstance(v, np.ndarray)
        }
        header["has_state"] = self.state is not None
        header["design"] = dict(self.design) if self.design is not None else None
        layout, blobs = _lay_out(self._arrays())
        header["arrays"] = layout
        return _seal(MAGIC, FORMAT_VERSION, header, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> Snapshot:
        """Parse and verify bytes from :meth:`to_bytes`; ``SnapshotError`` if invalid."""
        h, arrays = open_container(data, MAGIC, FORMAT_VERSION, "snapshot")
        try:
            state = None
            if h["has_state"]:
                state = dict(h["state"])
                state.update({k[6:]: v for k, v in arrays.items() if k.startswith("state.")})
            return cls(
                formula=h["formula"],
                method=h["method"],
                fixef=h["fixef"],
                fixef_se=h["fixef_se"],
                re_cov=h["re_cov"],
                sigma=h["sigma"],
                theta=h["theta"],
                criterion=h["criterion"],
                n_obs=h["n_obs"],
                singular=h["singular"],
                converged=h["converged"],
                n_events=h["n_events"],
                keys=h["keys"],
                b=arrays["b"],
                condvar=arrays["condvar"],
                group_n=arrays["group_n"],
                group_ybar=arrays["group_ybar"],
                b_np=arrays.get("b_np"),
                b_np_se=arrays.get("b_np_se"),
                fixef_vcov=arrays["fixef_vcov"],
                re_names=h["re_names"],
                dropped=h["dropped"],
                warnings=h["warnings"],
                optinfo=h["optinfo"],
                history=h["history"],
                resid_quantiles=h["resid_quantiles"],
                design=h.get("design"),
                offsets=h["offsets"],
                meta=h["meta"],
                state=state,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"snapshot header is malformed: {e}") from e

    # -- files --------------------------------------------------------------------------
    def save(self, directory) -> str:
        """Write atomically into a snapshot directory; returns the file's path."""
        from streamlmm.store import LocalStore

        return str(LocalStore(directory).write(self))

    @classmethod
    def load(cls, path) -> Snapshot:
        """The newest valid snapshot in a snapshot directory (corrupt newer files are
        skipped), or the snapshot in one file (``snapshot-000000000012.slmm``).

        ``FileNotFoundError`` for a missing path or a directory without a valid snapshot;
        :class:`SnapshotError` for a file that is not a valid snapshot.
        """
        import pathlib

        from streamlmm.store import LocalStore

        p = pathlib.Path(path)
        if p.is_file():
            try:
                return cls.from_bytes(p.read_bytes())
            except SnapshotError as e:
                raise SnapshotError(f"{path}: {e}") from None
        if not p.exists():
            raise FileNotFoundError(f"no snapshot directory or file {path}")
        snap = LocalStore(p).latest()
        if snap is None:
            raise FileNotFoundError(f"no valid snapshot in {path}")
        return snap
