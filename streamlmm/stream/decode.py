"""Bytes → validated columns, or a dead letter with a reason.

A message is one JSON object whose fields are named by the formula (group key,
features, response), with an optional frequency weight ``w`` and event time ``ts``.

Two paths, one set of rules:

- **Bulk.** A poll's messages are decoded by msgspec straight into typed structs (one
  C call per message, no dicts), then checked in bulk with numpy into columns: finite
  values, ``w >= 0``, key length. This is the path of every clean poll.
- **Per message.** A message that the bulk path does not accept as it stands is decoded
  alone by the reference path: the standard library's strict-UTF-8 JSON decoder and
  :class:`~streamlmm.rows.RowReader`, the validation of ``learn_one``. That path decides:
  it accepts (an integer-valued float group key, ``"w": null``), skips (``missing="skip"``)
  or rejects with the field name and why, exactly as ``learn_one`` would.

The bulk path only ever accepts what :class:`~streamlmm.rows.RowReader` accepts, with
the same values, so both paths give the same columns and the same dead letters.

"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from streamlmm.design import Design
from streamlmm.formula import Formula
from streamlmm.keys import MAX_KEY_LEN
from streamlmm.rows import RowReader

__all__ = ["Record", "Polled", "DeadLetter", "Batch", "Decoder", "MAX_MESSAGE_BYTES"]

MAX_MESSAGE_BYTES = 64 * 1024
_json_decode = json.JSONDecoder().decode


class Record(NamedTuple):
    """One message from a source: where it came from and its raw bytes.

    kafka-python's ``ConsumerRecord`` has the same fields, so Kafka records pass
    through without a copy.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None  # the source's record time (Kafka: ms since the epoch)


class Polled:
    """One poll as columns: the values, partitions and offsets, and full records on demand.

    Sources build the columns they have cheaply; :meth:`record` materialises one
    message (for a dead letter) only when it is needed.

    Examples
    --------
    >>> p = Polled.from_records([Record("t", 1, 7, b"k", b"{}")])
    >>> len(p), p.parts.tolist(), p.offsets.tolist(), p.record(0).key
    (1, [1], [7], b'k')

    """

    __slots__ = ("values", "parts", "offsets", "_record")

    def __init__(
        self,
        values: list[bytes | None],
        parts: np.ndarray,
        offsets: np.ndarray,
        record: Callable[[int], Record],
    ):
        self.values = values
        self.parts = parts
        self.offsets = offsets
        self._record = record

    @classmethod
    def from_records(cls, records: Sequence) -> Polled:
        """Columns of a list of :class:`Record` (or kafka-python ``ConsumerRecord``)."""
        n = len(records)
        return cls(
            [r.value for r in records],
            np.fromiter((r.partition for r in records), np.int64, n),
            np.fromiter((r.offset for r in records), np.int64, n),
            lambda i: records[i],
        )

    def record(self, i: int) -> Record:
        """The full ``i``-th message."""
        return self._record(i)

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self):
        """The full records, in poll order."""
        return (self.record(i) for i in range(len(self.values)))

    def last_offsets(self) -> dict[int, int]:
        """Per partition, the next offset after this poll's last message.

        >>> p = Polled([b"", b"", b""], np.array([0, 1, 0]), np.array([5, 9, 6]), None)
        >>> p.last_offsets()
        {0: 7, 1: 10}

        """
        if len(self.parts) == 0:
            return {}
        lo, hi = int(self.parts.min()), int(self.parts.max())
        if lo == hi:
            return {lo: int(self.offsets.max()) + 1}
        return {int(p): int(self.offsets[self.parts == p].max()) + 1 for p in np.unique(self.parts)}


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A message that could not be learned from, with the reason."""

    record: Record
    reason: str

    def to_json(self, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
        """JSON envelope: reason, origin, and the original bytes (base64, truncated at
        ``max_bytes`` with the full length and sha256 recorded)."""
        value = self.record.value or b""
        out: dict[str, Any] = {
            "reason": self.reason,
            "topic": self.record.topic,
            "partition": self.record.partition,
            "offset": self.record.offset,
            "key_b64": base64.b64encode(self.record.key).decode() if self.record.key else None,
            "value_b64": base64.b64encode(value[:max_bytes]).decode(),
            "value_len": len(value),
            "value_sha256": hashlib.sha256(value).hexdigest(),
            "truncated": len(value) > max_bytes,
        }
        return json.dumps(out, separators=(",", ":")).encode()


@dataclasses.dataclass
class Batch:
    """Validated events of one poll, as columns, plus the dead letters.

    ``idx`` is each kept event's position in the poll, ``parts`` its source partition.
    """

    keys: list
    A: np.ndarray
    y: np.ndarray
    w: np.ndarray
    t: np.ndarray | None
    dead: list[DeadLetter]
    idx: np.ndarray
    polled: Polled

    @property
    def parts(self) -> np.ndarray:
        """Source partition of each kept event."""
        return self.polled.parts[self.idx]

    @property
    def records(self) -> list[Record]:
        """The record of each kept event (built on demand)."""
        return [self.polled.record(int(i)) for i in self.idx]

    def drop(self, mask: np.ndarray, reason: Callable[[int], str]) -> None:
        """Move the events where ``mask`` is set to the dead letters, ``reason(i)`` why."""
        for i in np.flatnonzero(mask):
            self.dead.append(DeadLetter(self.polled.record(int(self.idx[i])), reason(int(i))))
        keep = np.flatnonzero(~mask)
        self.keys = [self.keys[i] for i in keep]
        self.idx = self.idx[keep]
        self.A, self.y, self.w = self.A[keep], self.y[keep], self.w[keep]
        if self.t is not None:
            self.t = self.t[keep]

    def __len__(self) -> int:
        return len(self.keys)


def _len(v: bytes | None) -> int:
    return -1 if v is None else len(v)


def _padded(rows: list[np.ndarray], k: int) -> np.ndarray:
    """Rows of union values as a matrix of width ``k``: rows encoded before a new level
    widened the design had 0 in its columns."""
    A = np.zeros((len(rows), k))
    for i, a in enumerate(rows):
        A[i, : a.shape[0]] = a
    return A


def _widened(A: np.ndarray, k: int) -> np.ndarray:
    if A.shape[1] == k:
        return A
    out = np.zeros((A.shape[0], k))
    out[:, : A.shape[1]] = A
    return out


class Decoder:
    """Decode and validate JSON events for a formula.

    Parameters
    ----------
    formula
        The formula (text or parsed), or the :class:`~streamlmm.rows.RowReader` of the
        model the events are for (then the model's factor levels are the decoder's).
    time_key
        Field holding the event time (``ts``), required in every event when given.
    missing
        ``"raise"`` sends an event with a missing field to the dead letters;
        ``"skip"`` drops it silently (counted), as lme4's ``na.omit``.
    max_bytes
        Larger messages are dead letters.

    Examples
    --------
    >>> dec = Decoder("y ~ x + (1 | g)")
    >>> recs = [Record("t", 0, i, None, v) for i, v in enumerate(
    ...     [b'{"g": "a", "x": 1, "y": 2.5}', b'{"g": "a", "x": "one", "y": 2}', b"{"])]
    >>> b = dec.decode(recs)
    >>> b.keys, b.A.tolist(), [d.reason for d in b.dead]
    (['a'], [[1.0, 1.0]], ["field 'x': expected a number, got str", 'invalid JSON: ...'])

    """

    def __init__(
        self,
        formula: Formula | str | RowReader,
        time_key: str | None = None,
        missing: str = "raise",
        max_bytes: int = MAX_MESSAGE_BYTES,
    ):
        if isinstance(formula, RowReader):
            self.reader = formula
            time_key = formula.time_key
        else:
            self.reader = RowReader(Design(formula), time_key, missing)
        self.time_key = time_key
        self.max_bytes = max_bytes
        self.n_skipped = 0
        self._fast = None
        self._fast_for: tuple | None = None  # the design layout the bulk decoder was made for

    @property
    def design(self) -> Design:
        return self.reader.design

    # -- the bulk path ------------------------------------------------------------------
    def _fast_decoder(self):
        """A msgspec decoder into a struct of the formula's fields, or ``None`` when the
        design is not (yet) plain numeric columns: then every message takes the
        reference path, which learns kinds and factor levels in message order."""
        try:
            import msgspec
        except ImportError:  # pragma: no cover - a runtime dependency
            return None
        d = self.design
        plain = d.plain
        if plain is None or not d.formula.response_expr.is_field:
            return None
        group, response = d.formula.group, d.formula.response_field
        feats = [fld for _, fld in plain]
        names = [group, *feats, response] + ([self.time_key] if self.time_key else [])
        if len(set(names)) != len(names) or "w" in names:
            return None  # ambiguous field roles: leave every message to the reference path
        fields: list[tuple] = [("k", str | int)]
        fields += [(f"f{i}", float) for i in range(len(feats))]
        fields += [("r", float)]
        if self.time_key:
            fields.append(("t", float))
        fields.append(("w", float, 1.0))
        rename = {"k": group, "r": response, "w": "w"}
        rename.update({f"f{i}": c for i, c in enumerate(feats)})
        if self.time_key:
            rename["t"] = self.time_key
        event = msgspec.defstruct("Event", fields, rename=rename)
        self._num = attrgetter(
            *[f"f{i}" for i in range(len(feats))], "r", "w", *(["t"] if self.time_key else [])
        )
        self._key = attrgetter("k")
        self._cols = [i for i, _ in plain]
        self._ones = list(d.ones)
        self._k = d.k
        return msgspec.json.Decoder(event).decode

    def _bulk(self, values: list, pos: np.ndarray):
        """Decode ``values[pos]`` in bulk: ``(keys, A, y, w, t, ok)`` for the positions
        ``ok`` that the bulk path accepts; the others are left to the reference path."""
        dec = self._fast
        vals = values if len(pos) == len(values) else [values[i] for i in pos]
        try:
            buf = b"".join(vals)
            if not buf.isascii():
                buf.decode("utf-8")  # strictly UTF-8, as the reference path
            events = [dec(v) for v in vals]
        except Exception:  # noqa: BLE001 - the poll fails as a whole: message by message
            events, ok = [], []
            for j, v in enumerate(vals):
                try:
                    if not v.isascii():
                        v.decode("utf-8")
                    events.append(dec(v))
                except Exception:  # noqa: BLE001 - the reference path gives the reason
                    continue
                ok.append(j)
            vals, pos = [vals[j] for j in ok], pos[np.array(ok, dtype=np.int64)]
        if not events:
            return [], None, None, None, None, pos
        return self._columns(events, vals, pos)

    def _columns(self, events: list, vals: list, pos: np.ndarray):
        n, nf = len(events), len(self._cols)
        num = np.array(list(map(self._num, events)), dtype=float).reshape(n, -1)
        keys = list(map(self._key, events))
        good = np.isfinite(num).all(axis=1) & (num[:, nf + 1] >= 0)
        long = np.flatnonzero(np.fromiter(map(len, vals), np.int64, n) > MAX_KEY_LEN)
        for i in long:  # only a message longer than the key limit can hold a long key
            k = keys[i]
            if type(k) is str and len(k) > MAX_KEY_LEN:
                good[i] = False
        A = np.empty((n, self._k))
        A[:, self._cols] = num[:, :nf]
        A[:, self._ones] = 1.0
        t = num[:, nf + 2] if self.time_key else None
        if not good.all():
            keep = np.flatnonzero(good)
            keys = [keys[i] for i in keep]
            A, num, pos = A[keep], num[keep], pos[keep]
            t = None if t is None else t[keep]
        return keys, A, num[:, nf], num[:, nf + 1], t, pos

    # -- the reference path -------------------------------------------------------------
    def _one(self, value: bytes | None):
        if value is None:
            raise ValueError("empty message (tombstone)")
        if len(value) > self.max_bytes:
            raise ValueError(f"message of {len(value)} bytes exceeds {self.max_bytes}")
        try:
            # strictly UTF-8 (RFC 8259 §8.1): json.loads(bytes) would also take UTF-16/32
            x = _json_decode(value.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"invalid JSON: {str(e)[:120]}") from None
        if not isinstance(x, dict):
            raise ValueError(f"event must be a JSON object, got {type(x).__name__}")
        reader = self.reader
        w = reader.weight(x.get("w"))  # before read(): a bad weight teaches no level
        t = reader.time(x) if self.time_key is not None else 0.0
        key = reader.read(x, x.get(reader.response))
        if key is None:
            return None
        return key, reader.y, w, t

    def _reference(self, polled: Polled, pos: np.ndarray, dead: list[DeadLetter]):
        """Message by message through the reference path (used for what bulk declined)."""
        n = len(pos)
        rows: list[np.ndarray] = []
        y, w, t = np.empty(n), np.empty(n), np.empty(n)
        keys: list = []
        kept: list[int] = []
        for i in pos:
            j = len(keys)
            try:
                got = self._one(polled.values[i])
            except ValueError as e:
                dead.append(DeadLetter(polled.record(int(i)), str(e)))
                continue
            if got is None:
                self.n_skipped += 1
                continue
            keys.append(got[0])
            kept.append(int(i))
            rows.append(self.reader.a[: self.design.k].copy())
            y[j], w[j], t[j] = got[1], got[2], got[3]
        m = len(keys)
        tk = t[:m] if self.time_key is not None else None
        return keys, _padded(rows, self.design.k), y[:m], w[:m], tk, np.array(kept, np.int64)

    # -- both ---------------------------------------------------------------------------
    def decode(self, polled: Polled | Sequence[Record]) -> Batch:
        """Decode a poll's messages; never raises for bad content.

        The kept events are in poll order; dead letters carry their reasons.
        """
        if not isinstance(polled, Polled):
            polled = Polled.from_records(polled)
        values = polled.values
        n = len(values)
        dead: list[DeadLetter] = []
        layout = (self.design.version, self.design.k, self.design.ready)
        if self._fast_for != layout:
            self._fast, self._fast_for = self._fast_decoder(), layout
        if self._fast is None or n == 0:
            return self._batch(polled, [self._reference(polled, np.arange(n), dead)], dead)
        lens = np.fromiter(map(_len, values), np.int64, n)
        fit = (lens > 0) & (lens <= self.max_bytes)
        pos = np.arange(n) if fit.all() else np.flatnonzero(fit)
        parts = [self._bulk(values, pos)] if len(pos) else []
        done = parts[0][5] if parts else np.empty(0, np.int64)
        if parts and not len(done):
            parts = []
        if len(done) < n:
            rest = np.setdiff1d(np.arange(n), done, assume_unique=True)
            parts.append(self._reference(polled, rest, dead))
        return self._batch(polled, parts, dead)

    def _batch(self, polled: Polled, parts: list, dead: list[DeadLetter]) -> Batch:
        if len(parts) == 1:
            keys, A, y, w, t, idx = parts[0]
        else:
            idx = np.concatenate([p[5] for p in parts])
            order = np.argsort(idx, kind="stable")
            keys_all = [k for p in parts for k in p[0]]
            keys = [keys_all[i] for i in order]
            k = self.design.k  # a level first seen in this poll widened the design
            A = np.concatenate([_widened(p[1], k) for p in parts])[order]
            y = np.concatenate([p[2] for p in parts])[order]
            w = np.concatenate([p[3] for p in parts])[order]
            t = None if self.time_key is None else np.concatenate([p[4] for p in parts])[order]
            idx = idx[order]
        if dead:
            dead.sort(key=lambda d: (d.record.partition, d.record.offset))
        return Batch(keys, A, y, w, t, dead, np.asarray(idx, dtype=np.int64), polled)
