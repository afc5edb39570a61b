"""The state-topic record: one group's statistics row, compact, versioned, no pickle.

Scale-out workers (``stream/worker.py``) write, after every batch and in the same Kafka
transaction as the consumed offsets, each changed group's statistics row to a compacted
*state topic*; the fitter (``stream/fitter.py``) and the query view
(``stream/statequery.py``) read them back. A record is

- **key**: the group's JSON literal (:func:`streamlmm.keys.key_to_json`), so the int 1
  and the string "1" stay different groups; a *partition marker* has the key
  ``{"partition":P}`` (a JSON object, never a group key);
- **value**: ``b"SLMS"``, a format version byte, the header length (uint32, little
  endian), a JSON header and the row as little-endian float64.

The header names everything needed to read the row without the writer: the formula,
method, source partition, the group's event count, the source offset the write covers
and the writer's design state (factor kinds and levels, and the union column *names*).
Workers learn factor levels in different orders, so a row is always re-mapped by column
name (:func:`remap_rows`) before rows of different writers meet. A column the reader does
not have is an error unless the row is exactly 0 there.

The row is :class:`~streamlmm.stats.GroupStats`' layout: ``[n, means of v, C packed]``
with ``v`` = the non-intercept union columns, then the response (docs/math.md §2).

Examples
--------
>>> import numpy as np
>>> from streamlmm.design import numeric_design
>>> d = numeric_design("y ~ x + (1 | g)")
>>> row = np.array([2.0, 3.0, 1.5, 2.0, 1.0, 0.5])
>>> key, value = encode_group("g1", 4, row, events=2, offset=17, formula="y ~ x + (1 | g)",
...                           method="REML", design=d.to_state())
>>> rec = decode_record(key, value)
>>> rec.key, rec.partition, rec.events, rec.offset, rec.row.tolist() == row.tolist()
('g1', 4, 2, 17, True)
>>> decode_record(*encode_marker(4, 17, "y ~ x + (1 | g)", "REML")).is_marker
True

"""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from streamlmm.design import FAC, Design
from streamlmm.formula import INTERCEPT
from streamlmm.kernels import packed_index
from streamlmm.keys import key_from_json, key_to_json

__all__ = [
    "MAGIC",
    "VERSION",
    "StateRecord",
    "encode_group",
    "encode_marker",
    "decode_record",
    "marker_key",
    "remap_rows",
    "absorb_design",
    "v_columns",
]

MAGIC = b"SLMS"
VERSION = 1
_HEAD = struct.Struct("<4sBI")
MAX_HEADER = 16 << 20


@dataclasses.dataclass
class StateRecord:
    """A decoded state-topic record (a group's row, or a partition marker)."""

    key: str | int | None  # None for a partition marker (its source topic: ``topic``)
    partition: int
    offset: int  # the source offset (next to read) this write covers
    formula: str
    method: str
    events: int = 0
    row: np.ndarray | None = None
    design: dict[str, Any] | None = None
    topic: str = ""

    @property
    def is_marker(self) -> bool:
        return self.key is None

    @property
    def columns(self) -> tuple[str, ...]:
        """The writer's union column names (the row's layout)."""
        return tuple(self.design["columns"]) if self.design else ()


def marker_key(partition: int) -> bytes:
    """The key of partition ``partition``'s marker: a JSON object, never a group key.

    >>> marker_key(3)
    b'{"partition":3}'

    """
    return b'{"partition":%d}' % int(partition)


def _value(header: Mapping[str, Any], row: np.ndarray | None) -> bytes:
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    body = b"" if row is None else np.ascontiguousarray(row, dtype="<f8").tobytes()
    return _HEAD.pack(MAGIC, VERSION, len(head)) + head + body


def encode_group(
    key: str | int,
    partition: int,
    row: np.ndarray,
    *,
    events: int,
    offset: int,
    formula: str,
    method: str,
    design: Mapping[str, Any],
) -> tuple[bytes, bytes]:
    """(key, value) of one group's statistics row."""
    header = {
        "kind": "group",
        "formula": formula,
        "method": method,
        "partition": int(partition),
        "events": int(events),
        "offset": int(offset),
        "width": int(row.shape[0]),
        "design": {k: v for k, v in design.items() if k != "formula"},
    }
    return key_to_json(key).encode(), _value(header, row)


def encode_marker(
    partition: int, offset: int, formula: str, method: str, topic: str = ""
) -> tuple[bytes, bytes]:
    """(key, value) of a partition marker: the source offset the partition's state covers.

    Every worker transaction writes one per partition it commits offsets for, so a reader
    can tell that it has read a partition's state up to its committed offset.
    """
    header = {
        "kind": "marker",
        "topic": topic,
        "formula": formula,
        "method": method,
        "partition": int(partition),
        "offset": int(offset),
    }
    return marker_key(partition), _value(header, None)


def decode_record(key: bytes | None, value: bytes | None) -> StateRecord:
    """Decode a state-topic record; ``ValueError`` saying what is wrong with a bad one."""
    if value is None:
        raise ValueError("state record has no value (a tombstone)")
    if len(value) < _HEAD.size:
        raise ValueError(f"state record of {len(value)} bytes is too short")
    magic, version, hlen = _HEAD.unpack_from(value)
    if magic != MAGIC:
        raise ValueError("state record does not start with SLMS: not a streamlmm state record")
    if version != VERSION:
        raise ValueError(f"state record format version {version} (this reader knows {VERSION})")
    if hlen > MAX_HEADER or _HEAD.size + hlen > len(value):
        raise ValueError("state record header length is out of range")
    try:
        h = json.loads(value[_HEAD.size : _HEAD.size + hlen])
        kind = h["kind"]
        common = {
            "partition": int(h["partition"]),
            "offset": int(h["offset"]),
            "formula": str(h["formula"]),
            "method": str(h["method"]),
        }
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"state record header is malformed: {e}") from None
    body = value[_HEAD.size + hlen :]
    if kind == "marker":
        if key != marker_key(common["partition"]):
            raise ValueError(f"marker record's key {key!r} does not name its partition")
        return StateRecord(None, topic=str(h.get("topic", "")), **common)
    if kind != "group":
        raise ValueError(f"state record of unknown kind {kind!r}")
    if key is None:
        raise ValueError("group state record without a key")
    gkey = key_from_json(key)
    try:
        width, events, design = int(h["width"]), int(h["events"]), dict(h["design"])
        ncols = len(design["columns"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"state record header is malformed: {e}") from None
    if len(body) != 8 * width:
        raise ValueError(f"state record row has {len(body)} bytes, expected {8 * width}")
    m = len(v_columns(design["columns"]))
    if width != 1 + m + m * (m + 1) // 2:
        raise ValueError(f"state record row of width {width} does not fit {ncols} columns")
    row = np.frombuffer(body, dtype="<f8").astype(float)
    if not np.all(np.isfinite(row)) or row[0] < 0 or events < 0:
        raise ValueError("state record row has non-finite values or a negative count")
    return StateRecord(gkey, events=events, row=row, design=design, **common)


def v_columns(columns: Sequence[str]) -> list[str]:
    """The names of a row's ``v``: the non-intercept union columns (the response last,
    as ``None``).

    >>> v_columns(["(Intercept)", "x", "fb"])
    ['x', 'fb', None]

    """
    return [c for c in columns if c != INTERCEPT] + [None]


def relayout(row: np.ndarray, src_state: Mapping[str, Any] | None, dst: Design) -> np.ndarray:
    """A state row written under the design ``src_state`` (the writer's), re-laid for the
    reader's design ``dst``: by column, and across different factor reference levels.

    Each union column is a product of atoms (numeric fields, factor indicators
    ``[f = l]``). A reader's column whose indicator is the writer's *reference* level is
    ``[f = ref] = 1 − Σ_{l ≠ ref} [f = l]``, so every reader column is an affine function
    ``v' = T v + t`` of the writer's columns, and the row maps exactly: ``n`` stays,
    means ``m' = T m + t``, co-moments ``C' = T C T'``. A level the writer never saw is a
    column of zeros. ``ValueError`` when a column cannot be expressed.
    """
    src = tuple(src_state["columns"]) if src_state else tuple(dst.columns)
    if src == tuple(dst.columns):
        return np.atleast_2d(np.asarray(row, dtype=float))[0].copy()
    if not src_state or "keys" not in src_state:
        return remap_rows(row, src, dst.columns)[0]
    T, t = _affine_map(src_state, dst)
    M = np.atleast_2d(np.asarray(row, dtype=float))[0]
    vs = v_columns(src)
    ms, md = len(vs), T.shape[0]
    Ps, Pd = packed_index(ms), packed_index(md)
    mean = M[1 : 1 + ms]
    C = M[1 + ms + Ps]
    out = np.empty(1 + md + md * (md + 1) // 2)
    out[0] = M[0]
    out[1 : 1 + md] = T @ mean + t
    Cd = T @ C @ T.T
    iu = np.triu_indices(md)
    out[1 + md + Pd[iu]] = Cd[iu]
    return out


def _affine_map(src_state: Mapping[str, Any], dst: Design) -> tuple[np.ndarray, np.ndarray]:
    """``(T, t)`` with ``v_dst = T v_src + t`` (the response maps to itself)."""
    src_cols = list(src_state["columns"])
    keys = [frozenset((lab, lev) for lab, lev in k) for k in src_state["keys"]]
    levels = {f: list(v) for f, v in src_state.get("levels", {}).items()}
    vs, vd = v_columns(src_cols), v_columns(dst.columns)
    vpos = {c: i for i, c in enumerate(vs)}
    index = {k: vpos.get(c, -1) for k, c in zip(keys, src_cols)}  # -1: the intercept
    T = np.zeros((len(vd), len(vs)))
    t = np.zeros(len(vd))
    T[-1, -1] = 1.0  # the response
    for name, key in zip(dst.columns, dst._keys):
        if name == INTERCEPT:
            continue
        j = vd.index(name)
        if key in index:  # the same column (same atoms), whatever its name
            T[j, index[key]] = 1.0
            continue
        if any(lev is not None and lev not in levels.get(lab, [lev]) for lab, lev in key):
            continue  # a level the writer never saw: 0 in all its events
        fixed = [a for a in key if a[1] is None or a[1] != levels.get(a[0], [None])[0]]
        subst = [a for a in key if a not in fixed]  # indicators of the writer's reference
        options = [[None] + [(f, lv) for lv in levels[f][1:]] for f, _ in subst]
        for choice in itertools.product(*options):
            chosen = [c for c in choice if c is not None]
            term = frozenset(fixed + chosen)
            if term not in index:
                raise ValueError(
                    f"column {name!r} cannot be expressed in the state row's columns "
                    f"{src_cols} (declare the factors' levels with --levels)"
                )
            sign = -1.0 if len(chosen) % 2 else 1.0
            i = index[term]
            if i < 0:
                t[j] += sign
            else:
                T[j, i] += sign
    return T, t


def remap_rows(M: np.ndarray, src: Sequence[str], dst: Sequence[str]) -> np.ndarray:
    """Rows laid out for union columns ``src`` re-laid for columns ``dst`` by name.

    A ``dst`` column that ``src`` lacks gets exact zeros (those events had 0 there,
    docs/math.md §9); a ``src`` column that ``dst`` lacks is a ``ValueError`` unless
    the rows are 0 in it (its mean and co-moments; e.g. a level only other data had).

    >>> M = np.array([[2.0, 1.0, 3.0, 0.5, 0.1, 0.2]])  # v = [x, y]
    >>> remap_rows(M, ["(Intercept)", "x"], ["(Intercept)", "z", "x"]).tolist()
    [[2.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.5, 0.1, 0.2]]
    >>> remap_rows(M[0], ["x"], ["x"]).shape  # always 2-d
    (1, 6)

    """
    M = np.atleast_2d(np.asarray(M, dtype=float))
    if tuple(src) == tuple(dst):
        return M.copy()
    vs, vd = v_columns(src), v_columns(dst)
    ms, md = len(vs), len(vd)
    where = {c: i for i, c in enumerate(vd)}
    Ps, Pd = packed_index(ms), packed_index(md)
    out = np.zeros((M.shape[0], 1 + md + md * (md + 1) // 2))
    out[:, 0] = M[:, 0]
    lost = []
    pos = np.full(ms, -1)
    for i, c in enumerate(vs):
        if c in where:
            pos[i] = where[c]
        else:
            lost.append(i)
    for i in lost:
        used = [1 + i] + [1 + ms + Ps[i, j] for j in range(ms)]
        if np.any(M[:, used] != 0):
            raise ValueError(
                f"column {vs[i]!r} of the state row is not a column of the reader's design "
                "(factor levels with different reference levels?): declare the factors' "
                "levels, or read the row with a design that has the column"
            )
    keep = np.flatnonzero(pos >= 0)
    out[:, 1 + pos[keep]] = M[:, 1 + keep]
    for a in keep:
        for b in keep[keep >= a]:
            out[:, 1 + md + Pd[pos[a], pos[b]]] = M[:, 1 + ms + Ps[a, b]]
    return out


def absorb_design(design: Design, state: Mapping[str, Any]) -> bool:
    """Teach ``design`` the factor kinds and levels of another design's ``state``.

    Columns are only appended (exact widening, docs/math.md §9). Returns whether the
    design's columns grew. ``ValueError`` if a field's kind differs (numeric here, a
    factor there).

    >>> a, b = Design("y ~ f + (1 | g)"), Design("y ~ f + (1 | g)")
    >>> _ = a.encode_one({"f": "u"}, np.empty(4), learn=True)
    >>> _ = b.encode_one({"f": "u"}, np.empty(4), learn=True)
    >>> _ = b.encode_one({"f": "v"}, np.empty(4), learn=True)
    >>> absorb_design(a, b.to_state()), a.columns
    (True, ('(Intercept)', 'fv'))

    """
    try:
        kinds = dict(state.get("kinds", {}))
        levels = {f: list(v) for f, v in state.get("levels", {}).items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"design state is malformed: {e}") from None
    new_kinds = {}
    for fld, kind in kinds.items():
        if fld not in design._kind:
            raise ValueError(f"design state names field {fld!r}, which the formula does not read")
        have = design._kind[fld]
        if have is None:
            new_kinds[fld] = kind
        elif have != kind:
            raise ValueError(f"field {fld!r} is {have} here but {kind} in the state record")
    new_levels = []
    for fld, levs in levels.items():
        if kinds.get(fld, design._kind.get(fld)) != FAC:
            continue
        known = design._codes.get(fld, {})
        for v in levs:
            if v not in known and (fld, v) not in new_levels:
                new_levels.append((fld, v))
    if not new_kinds and not new_levels:
        return False
    k0, v0 = design.k, design.version
    design._commit(new_kinds, new_levels)
    design._rebuild()
    return design.k != k0 or design.version != v0
