"""Bytes → validated columns, or a dead letter with a reason.

A message is one JSON object whose fields are named by the formula (group key,
features, response), with an optional frequency weight ``w`` and event time ``ts``.
Validation is :class:`~streamlmm.rows.RowReader`'s, the same as ``learn_one``'s.

"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any, NamedTuple

import numpy as np

from streamlmm.design import Design
from streamlmm.formula import Formula
from streamlmm.rows import RowReader

__all__ = ["Record", "DeadLetter", "Batch", "Decoder", "MAX_MESSAGE_BYTES"]

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
    """Validated events of one poll, as columns, plus the dead letters."""

    keys: list
    A: np.ndarray
    y: np.ndarray
    w: np.ndarray
    t: np.ndarray | None
    dead: list[DeadLetter]
    records: list[Record]  # the record of each kept event

    @property
    def parts(self) -> list[int]:
        """Source partition of each kept event."""
        return [r.partition for r in self.records]

    def drop(self, mask: np.ndarray, reason) -> None:
        """Move the events where ``mask`` is set to the dead letters, ``reason(i)`` why."""
        for i in np.flatnonzero(mask):
            self.dead.append(DeadLetter(self.records[i], reason(i)))
        keep = np.flatnonzero(~mask)
        self.keys = [self.keys[i] for i in keep]
        self.records = [self.records[i] for i in keep]
        self.A, self.y, self.w = self.A[keep], self.y[keep], self.w[keep]
        if self.t is not None:
            self.t = self.t[keep]

    def __len__(self) -> int:
        return len(self.keys)


class Decoder:
    """Decode and validate JSON events for a formula.

    Parameters
    ----------
    formula
        The parsed formula.
    time_key
        Field holding the event time (``ts``), required in every event when given.
    missing
        ``"raise"`` sends an event with a missing field to the dead letters;
        ``"skip"`` drops it silently (counted), as lme4's ``na.omit``.
    max_bytes
        Larger messages are dead letters.

    Examples
    --------
    >>> from streamlmm.formula import parse_formula
    >>> dec = Decoder(parse_formula("y ~ x + (1 | g)"))
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
        if isinstance(formula, RowReader):  # a model's own reader: levels are shared
            self.reader = formula
            time_key = formula.time_key
        else:
            self.reader = RowReader(Design(formula), time_key, missing)
        self.response = self.reader.response
        self.time_key = time_key
        self.max_bytes = max_bytes
        self.n_skipped = 0

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
        w = reader.weight(x.get("w"))
        t = reader.time(x) if self.time_key is not None else 0.0
        key = reader.read(x, x.get(self.response))
        if key is None:
            return None
        return key, reader.y, w, t

    def decode(self, records: list[Record]) -> Batch:
        """Decode a poll's records; never raises for bad content."""
        n = len(records)
        rows: list[np.ndarray] = []
        y, w, t = np.empty(n), np.empty(n), np.empty(n)
        keys: list = []
        kept: list[Record] = []
        dead: list[DeadLetter] = []
        for rec in records:
            i = len(keys)
            try:
                got = self._one(rec.value)
            except ValueError as e:
                dead.append(DeadLetter(rec, str(e)))
                continue
            if got is None:
                self.n_skipped += 1
                continue
            keys.append(got[0])
            kept.append(rec)
            rows.append(self.reader.a[: self.reader.design.k].copy())
            y[i], w[i], t[i] = got[1], got[2], got[3]
        m = len(keys)
        # a level first seen in this poll widened the design: earlier rows had 0 there
        A = np.zeros((m, self.reader.design.k))
        for i, a in enumerate(rows):
            A[i, : a.shape[0]] = a
        t_kept = t[:m] if self.time_key is not None else None
        return Batch(keys, A, y[:m], w[:m], t_kept, dead, kept)
