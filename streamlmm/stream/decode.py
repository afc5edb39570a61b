"""Bytes → validated columns, or a dead letter with a reason.

A message is one JSON object whose fields are named by the formula (group key,
features, response), with an optional frequency weight ``w`` and event time ``ts``.

Three paths, one set of rules; each takes what the previous one declined:

- **Scan.** A poll's messages, laid end to end in one buffer, are read by one numba call
  (:mod:`~streamlmm.stream.jsonscan`) into numeric columns and key byte ranges, and the
  keys become codes of the decoder's :class:`~streamlmm.keytable.KeyTable`. It
  takes flat objects with plain ASCII strings and a string group key: every clean poll.
- **Struct.** msgspec decodes a declined message into a typed struct (one C call, no
  dict): non-ASCII or escaped strings, integer keys, nested fields it ignores.
- **Per message.** What neither accepts as it stands is decoded alone by the reference
  path: the standard library's strict-UTF-8 JSON decoder and
  :class:`~streamlmm.rows.RowReader`, the validation of ``learn_one``. That path decides:
  it accepts (an integer-valued float group key, ``"w": null``), skips (``missing="skip"``)
  or rejects with the field name and why, exactly as ``learn_one`` would.

The bulk paths check their columns with numpy as the reference path checks a value
(finite, within ±``MAX_ABS``, ``w >= 0``, key length) and only ever accept what
:class:`~streamlmm.rows.RowReader` accepts, with the same values, so all paths give the
same columns and the same dead letters. Until the design knows its fields' kinds (its
first events) messages take the reference path, a few at a time.

"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from streamlmm import kernels
from streamlmm.design import Design
from streamlmm.formula import Formula
from streamlmm.keys import MAX_KEY_LEN
from streamlmm.keytable import KeyTable
from streamlmm.rows import RowReader
from streamlmm.stream import jsonscan
from streamlmm.values import MAX_ABS, overflow_message

log = logging.getLogger(__name__)

__all__ = [
    "Record",
    "Polled",
    "DeadLetter",
    "Batch",
    "Decoder",
    "MAX_MESSAGE_BYTES",
    "distinct_partitions",
]

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
    message (for a dead letter) only when it is needed. ``offsets`` may be given as a
    function that builds them when first needed, by a source whose polls hold each
    partition's messages in offset order: the next offsets after a poll then take
    one record per partition. ``values`` may be a function of the position, then the
    list is built only if a slow path asks for it; ``packed`` is the values laid end
    to end in one buffer with their ``n + 1`` bounds, which the decoder scans in
    place. ``errors`` marks the client's error events, which never move an offset.
    ``positions`` (set by Kafka sources) is the consumer's position per partition right
    after the poll, which moves past transaction markers the poll did not deliver.

    Examples
    --------
    >>> p = Polled.from_records([Record("t", 1, 7, b"k", b"{}")])
    >>> len(p), p.parts.tolist(), p.offsets.tolist(), p.record(0).key
    (1, [1], [7], b'k')

    """

    __slots__ = (
        "_values", "parts", "_offsets", "_record", "_error", "_last", "packed", "errors",
        "positions",
    )  # fmt: skip

    def __init__(
        self,
        values: list[bytes | None] | Callable[[int], bytes | None],
        parts: np.ndarray,
        offsets: np.ndarray | Callable[[], np.ndarray],
        record: Callable[[int], Record],
        error: Callable[[int], Any] | None = None,
        *,
        packed: tuple[np.ndarray, np.ndarray] | None = None,
        errors: np.ndarray | None = None,
    ):
        self._values = values
        self.parts = parts
        self._offsets = offsets
        self._record = record
        self._error = error
        self._last: dict[int, int] | None = None
        self.packed = packed
        self.errors = errors
        # per partition, the consumer's position right after this poll: past the poll's
        # messages and past any transaction markers or aborted records that follow them
        # (which are never delivered); set by Kafka sources
        self.positions: dict[int, int] | None = None

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

    def value(self, i: int) -> bytes | None:
        """The ``i``-th message's value, without building :attr:`values`."""
        return self._values(i) if callable(self._values) else self._values[i]

    @property
    def values(self) -> list[bytes | None]:
        """Each message's value (``None`` for a tombstone)."""
        if callable(self._values):
            self._values = list(map(self._values, range(len(self.parts))))
        return self._values

    @property
    def offsets(self) -> np.ndarray:
        """Each message's offset."""
        if callable(self._offsets):
            self._offsets = self._offsets()
        return self._offsets

    def record(self, i: int) -> Record:
        """The full ``i``-th message."""
        return self._record(i)

    def error(self, i: int) -> Any:
        """The client's error if the ``i``-th message is an error event, else ``None``.

        A client that delivers errors in a poll (confluent-kafka) gives a way to ask;
        its error events have no JSON value, so the decoder asks only about messages
        the bulk paths decline, and :meth:`last_offsets` about each partition's last.
        """
        return None if self._error is None else self._error(i)

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self):
        """The full records, in poll order."""
        return (self.record(i) for i in range(len(self)))

    def last_offsets(self) -> dict[int, int]:
        """Per partition, the next offset after this poll's last message.

        >>> p = Polled([b"", b"", b""], np.array([0, 1, 0]), np.array([5, 9, 6]), None)
        >>> p.last_offsets()
        {0: 7, 1: 10}
        >>> recs = [Record("t", 0, 5, None, b""), Record("t", 1, 9, None, b""),
        ...         Record("t", 0, 6, None, b"")]
        >>> Polled([b""] * 3, np.array([0, 1, 0]), lambda: None, recs.__getitem__).last_offsets()
        {0: 7, 1: 10}

        """
        if self._last is None:
            self._last = self._last_offsets()
        return self._last

    def _last_offsets(self) -> dict[int, int]:
        parts, n = self.parts, len(self.parts)
        if n == 0:
            return {}
        distinct = distinct_partitions(parts)
        if callable(self._offsets):  # in offset order: each partition's last message
            rev = parts[::-1]
            last = {p: n - 1 - int(np.argmax(rev == p)) for p in distinct}
            if any(self.error(i) is not None for i in last.values()) or min(last) < 0:
                ok = [i for i in range(n) if self.error(i) is None]  # rare: error events
                last = {int(parts[i]): i for i in ok}
            return {p: self.record(i).offset + 1 for p, i in sorted(last.items())}
        offsets = self.offsets
        if self.errors is not None and self.errors.any():
            keep = ~self.errors
            if not keep.any():
                return {}
            parts, offsets = parts[keep], offsets[keep]
            distinct = distinct_partitions(parts)
        if len(distinct) == 1:
            return {distinct[0]: int(offsets.max()) + 1}
        return {p: int(offsets[parts == p].max()) + 1 for p in distinct}


def distinct_partitions(parts: np.ndarray) -> list[int]:
    """The distinct partitions of a poll, ascending (a poll holds few: no sort, no hash).

    >>> distinct_partitions(np.array([2, 0, 2, -1]))
    [-1, 0, 2]

    """
    lo, hi = int(parts.min()), int(parts.max())
    if lo == hi:
        return [lo]
    return (np.flatnonzero(np.bincount(parts - lo)) + lo).tolist()


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

    Group keys are coded: event ``i`` is in group ``uniques[codes[i]]``, where
    ``uniques`` is the decoder's :class:`~streamlmm.keytable.KeyTable` list (it
    only grows, and a key keeps its code for the decoder's life). ``idx`` is each kept
    event's position in the poll, ``parts`` its source partition.
    """

    uniques: list
    codes: np.ndarray
    A: np.ndarray
    y: np.ndarray
    w: np.ndarray
    t: np.ndarray | None
    dead: list[DeadLetter]
    idx: np.ndarray
    polled: Polled
    _keys: list | None = dataclasses.field(default=None, repr=False)

    @property
    def keys(self) -> list:
        """The group key of each kept event (built once, on demand)."""
        if self._keys is None:
            u = self.uniques
            self._keys = [u[c] for c in self.codes.tolist()]
        return self._keys

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
        self.codes, self.idx = self.codes[keep], self.idx[keep]
        self.A, self.y, self.w = self.A[keep], self.y[keep], self.w[keep]
        if self.t is not None:
            self.t = self.t[keep]
        self._keys = None

    def refuse_overflows(self, design: Design) -> None:
        """Events whose weighted products ``w·v·v'`` would overflow the statistics become
        dead letters: each value is within ±MAX_ABS, their products need not be, and
        the model refuses a batch that holds one (as ``learn_one`` refuses the event)."""
        if not len(self):
            return
        cols = np.arange(self.A.shape[1])
        if kernels.first_overflow(self.A, self.y, self.w, cols, MAX_ABS * MAX_ABS) < 0:
            return  # one pass, no temporaries: the common case
        vmax = np.maximum(np.abs(self.A).max(axis=1, initial=0.0), np.abs(self.y))
        over = ~(self.w * vmax * vmax <= MAX_ABS * MAX_ABS)
        if over.any():
            names = [*design.columns, design.formula.response_field]
            self.drop(
                over,
                lambda i: overflow_message(names, np.append(self.A[i], self.y[i]), self.w[i]),
            )

    def __len__(self) -> int:
        return self.codes.shape[0]


class _Part(NamedTuple):
    """Events of a poll decoded by one path: key codes, columns, poll positions."""

    codes: np.ndarray
    A: np.ndarray
    y: np.ndarray
    w: np.ndarray
    t: np.ndarray | None
    pos: np.ndarray


def _taken(values: list, pos: np.ndarray) -> list:
    """``values[pos]`` (the list itself when ``pos`` takes all of it, in order)."""
    return values if len(pos) == len(values) else [values[i] for i in pos.tolist()]


def _len(v: bytes | None) -> int:
    return -1 if v is None else len(v)


def _lengths(values: list[bytes | None]) -> np.ndarray:
    """Each message's length in bytes; -1 for a tombstone (``None``)."""
    try:
        return np.fromiter(map(len, values), np.int64, len(values))
    except TypeError:  # a tombstone
        return np.fromiter(map(_len, values), np.int64, len(values))


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
        self.keys = KeyTable()  # every group key decoded, with its code
        self._fast: _Fast | None = None
        self._fast_for: tuple | None = None  # the design layout the bulk decoder was made for

    @property
    def design(self) -> Design:
        return self.reader.design

    # -- the bulk paths -----------------------------------------------------------------
    def _layout(self) -> None:
        """(Re)build the bulk decoders when the design's layout changed."""
        layout = (self.design.version, self.design.k, self.design.ready)
        if self._fast_for != layout:
            self._fast, self._fast_for = self._fast_decoders(), layout

    def _fast_decoders(self) -> _Fast | None:
        """The bulk decoders for the formula's fields, or ``None`` when the design is not
        (yet) plain numeric columns: then every message takes the reference path, which
        learns kinds and factor levels in message order."""
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
        # numeric columns, in this order: features, response, weight, time
        numeric = [*feats, response, "w"] + ([self.time_key] if self.time_key else [])
        fields: list[tuple] = [("k", str | int)]
        fields += [(f"f{i}", float) for i in range(len(numeric))]
        w_at = len(feats) + 1
        fields[1 + w_at] = (f"f{w_at}", float, 1.0)
        rename = {"k": group, **{f"f{i}": c for i, c in enumerate(numeric)}}
        event = msgspec.defstruct("Event", fields, rename=rename, kw_only=True)
        table, offsets = jsonscan.field_table([group, *numeric])
        defaults = np.full(len(numeric), np.nan)
        defaults[w_at] = 1.0
        required = sum(1 << f for f in range(len(numeric) + 1) if f != 1 + w_at)
        return _Fast(
            msgspec.json.Decoder(event).decode,
            attrgetter(*[f"f{i}" for i in range(len(numeric))]),
            table,
            offsets,
            required,
            defaults,
            [i for i, _ in plain],
            list(d.ones),
            d.k,
            w_at,
        )

    def _scan(self, values: list, pos: np.ndarray, lens: np.ndarray) -> tuple[_Part, np.ndarray]:
        """The numba scan of ``values[pos]`` (:mod:`~streamlmm.stream.jsonscan`), whose
        lengths are ``lens[pos]``: the events it accepts, and the positions it declined."""
        starts = np.zeros(len(pos) + 1, np.int64)
        np.cumsum(lens[pos], out=starts[1:])
        joined = np.frombuffer(b"".join(_taken(values, pos)), np.uint8)
        return self._scan_buffer(joined, starts, pos)

    def _scan_packed(
        self, buf: np.ndarray, starts: np.ndarray, pos: np.ndarray
    ) -> tuple[_Part, np.ndarray] | None:
        """:meth:`_scan` of a poll whose values lie end to end in ``buf`` (message ``i``
        is ``buf[starts[i]:starts[i + 1]]``), scanned in place; ``pos`` is a run of
        positions up to the poll's end."""
        if self._fast is None:
            return None
        at = starts[int(pos[0]) :] if len(pos) else starts[:1]
        return self._scan_buffer(buf, at, pos)

    def _scan_buffer(
        self, buf: np.ndarray, starts: np.ndarray, pos: np.ndarray
    ) -> tuple[_Part, np.ndarray]:
        """The scan of the messages ``buf[starts[r]:starts[r + 1]]``, which are
        ``values[pos[r]]``: the events it accepts, and the positions it declined (empty
        messages, tombstones too, and messages over :attr:`max_bytes` among them)."""
        num, kpos, ok = self._scan_columns(len(pos))
        jsonscan.scan(buf, starts, *self._scan_args(), num, kpos, ok)
        ok &= np.diff(starts) <= self.max_bytes
        return self._accepted(buf, num, kpos, ok, pos)

    def _scan_joined(self, values: list, pos: np.ndarray) -> tuple[_Part, np.ndarray] | None:
        """:meth:`_scan` of ``values[pos]`` joined by NUL bytes, which the scan splits as
        it goes: the common case, with no Python call per message. ``None`` when the
        poll is not for it (a tombstone, a NUL inside a message, a message empty or over
        :attr:`max_bytes`): then the lengths are taken."""
        if self._fast is None:
            return None
        n = len(pos)
        try:
            joined = b"\x00".join(_taken(values, pos))
        except TypeError:  # a tombstone (None)
            return None
        starts = np.empty(n + 1, np.int64)
        num, kpos, ok = self._scan_columns(n)
        buf = np.frombuffer(joined, np.uint8)
        if jsonscan.scan_split(buf, 0, starts, *self._scan_args(), num, kpos, ok) != n:
            return None
        lens = np.diff(starts) - 1
        if not ((lens > 0) & (lens <= self.max_bytes)).all():
            return None
        return self._accepted(joined, num, kpos, ok, pos)

    def _scan_columns(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The scan's outputs for ``n`` messages: numbers, key byte ranges, accepted."""
        num = np.empty((n, len(self._fast.defaults)))
        return num, np.empty((n, 2), np.int64), np.empty(n, np.bool_)

    def _scan_args(self) -> tuple:
        """The scan's settings after the message bounds (see :func:`jsonscan.scan`)."""
        fast = self._fast
        return (
            fast.table, fast.offsets, fast.required, fast.defaults, MAX_KEY_LEN, MAX_ABS,
            fast.w_at,
        )  # fmt: skip

    def _accepted(self, joined, num, kpos, ok, pos) -> tuple[_Part, np.ndarray]:
        """The scanned messages it accepted, keys interned; the positions it declined."""
        codes = self.keys.ids_of_slices(joined, kpos, ok)
        if ok.all():
            return self._part(codes, num, pos), pos[:0]
        keep = np.flatnonzero(ok)
        return self._part(codes[keep], num[keep], pos[keep]), pos[~ok]

    def _msgspec(self, values: list, pos: np.ndarray, lens: np.ndarray) -> tuple[_Part, np.ndarray]:
        """msgspec's decode of each of ``values[pos]`` into a struct: the events it
        accepts, and the positions it declined (``lens`` as for :meth:`_scan`)."""
        fast = self._fast
        events, ok = [], []
        for j, i in enumerate(pos.tolist()):
            v = values[i]
            try:
                if not v.isascii():
                    v.decode("utf-8")  # strictly UTF-8, as the reference path
                events.append(fast.decode(v))
            except Exception:  # noqa: BLE001 - the reference path gives the reason
                continue
            ok.append(j)
        n = len(events)
        taken = pos[np.array(ok, np.int64)]
        num = np.array(list(map(fast.numbers, events)), dtype=float).reshape(n, len(fast.defaults))
        keys = [e.k for e in events]
        good = self._valid(num)
        for j, k in enumerate(keys):
            if type(k) is str and len(k) > MAX_KEY_LEN:
                good[j] = False
        keep = np.flatnonzero(good)
        codes = self.keys.ids([keys[j] for j in keep])
        declined = np.setdiff1d(pos, taken[keep], assume_unique=True)
        return self._part(codes, num[keep], taken[keep]), declined

    def _valid(self, num: np.ndarray) -> np.ndarray:
        """Rows whose numbers the reference path takes as they are: finite, within
        ±:data:`~streamlmm.values.MAX_ABS`, weight ``>= 0``."""
        good = (np.abs(num) <= MAX_ABS).all(axis=1)  # NaN fails too
        good &= num[:, self._fast.w_at] >= 0
        return good

    def _part(self, codes: np.ndarray, num: np.ndarray, pos: np.ndarray) -> _Part:
        """Columns of accepted rows: the union values, response, weight and time."""
        fast, n = self._fast, num.shape[0]
        nf = len(fast.cols)
        A = np.empty((n, fast.k))
        A[:, fast.cols] = num[:, :nf]
        A[:, fast.ones] = 1.0
        t = num[:, fast.w_at + 1] if self.time_key else None
        return _Part(codes, A, num[:, nf], num[:, fast.w_at], t, pos)

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

    def _reference(self, polled: Polled, pos: np.ndarray, dead: list[DeadLetter]) -> _Part:
        """Message by message through the reference path (used for what bulk declined)."""
        n = len(pos)
        rows: list[np.ndarray] = []
        y, w, t = np.empty(n), np.empty(n), np.empty(n)
        keys: list = []
        kept: list[int] = []
        for i in pos.tolist():
            j = len(keys)
            err = polled.error(i)
            if err is not None:  # the client's error event: not a message, not learned
                fatal = getattr(err, "fatal", None)
                if fatal is not None and fatal():
                    raise RuntimeError(f"kafka consumer: {err}")
                log.warning("kafka consumer: %s", err)
                continue
            try:
                got = self._one(polled.value(i))
            except ValueError as e:
                dead.append(DeadLetter(polled.record(i), str(e)))
                continue
            if got is None:
                self.n_skipped += 1
                continue
            keys.append(got[0])
            kept.append(i)
            rows.append(self.reader.a[: self.design.k].copy())
            y[j], w[j], t[j] = got[1], got[2], got[3]
        m = len(keys)
        tk = t[:m] if self.time_key is not None else None
        A = _padded(rows, self.design.k)
        return _Part(self.keys.ids(keys), A, y[:m], w[:m], tk, np.array(kept, np.int64))

    # -- all paths ----------------------------------------------------------------------
    def decode(self, polled: Polled | Sequence[Record]) -> Batch:
        """Decode a poll's messages; never raises for bad content.

        The kept events are in poll order; dead letters carry their reasons.
        """
        if not isinstance(polled, Polled):
            polled = Polled.from_records(polled)
        dead: list[DeadLetter] = []
        parts, rest = self._until_plain(polled, dead)
        if len(rest):
            if polled.packed is not None:
                got = self._scan_packed(*polled.packed, rest)
            else:
                got = self._scan_joined(polled.values, rest)
            if got is not None:
                parts.append(got[0])
                rest = got[1]
        if len(rest):
            lens = _lengths(polled.values)
            fit = (lens[rest] > 0) & (lens[rest] <= self.max_bytes)
            for path in (self._scan, self._msgspec):
                if not fit.any():
                    break
                part, declined = path(polled.values, rest[fit], lens)
                parts.append(part)
                rest = np.sort(np.concatenate([rest[~fit], declined]))
                fit = np.isin(rest, declined, assume_unique=True)
            if len(rest):
                parts.append(self._reference(polled, rest, dead))
        return self._batch(polled, parts, dead)

    def _until_plain(self, polled: Polled, dead: list[DeadLetter]) -> tuple[list, np.ndarray]:
        """Reference-decode the poll's first messages, more each time, until the design
        has a bulk layout (its fields' kinds are known); the positions left."""
        n, done, step = len(polled), 0, 16
        parts: list[_Part] = []
        self._layout()
        while self._fast is None and done < n:
            parts.append(self._reference(polled, np.arange(done, min(n, done + step)), dead))
            done, step = min(n, done + step), 2 * step
            self._layout()
        return parts, np.arange(done, n)

    def _batch(self, polled: Polled, parts: list[_Part], dead: list[DeadLetter]) -> Batch:
        if dead:
            dead.sort(key=lambda d: (d.record.partition, d.record.offset))
        parts = [p for p in parts if len(p.pos)] or [self._no_part()]
        if len(parts) == 1:
            p = parts[0]
            return Batch(self.keys.keys, p.codes, p.A, p.y, p.w, p.t, dead, p.pos, polled)
        k = self.design.k  # a level first seen in this poll widened the design
        idx = np.concatenate([p.pos for p in parts])
        order = np.argsort(idx, kind="stable")
        codes = np.concatenate([p.codes for p in parts])[order]
        A = np.concatenate([_widened(p.A, k) for p in parts])[order]
        y = np.concatenate([p.y for p in parts])[order]
        w = np.concatenate([p.w for p in parts])[order]
        t = None if self.time_key is None else np.concatenate([p.t for p in parts])[order]
        return Batch(self.keys.keys, codes, A, y, w, t, dead, idx[order], polled)

    def _no_part(self) -> _Part:
        """No events."""
        none = np.empty(0, np.int64)
        t = None if self.time_key is None else np.empty(0)
        return _Part(none, np.empty((0, self.design.k)), np.empty(0), np.empty(0), t, none)


class _Fast(NamedTuple):
    """The bulk decoders of one design layout."""

    decode: Callable[[bytes], Any]  # msgspec: one message into a struct
    numbers: Callable[[Any], tuple]  # a struct's numeric fields, in column order
    table: np.ndarray  # the scan's field names: group, then the numeric fields
    offsets: np.ndarray
    required: int  # bit set of the fields an event must have
    defaults: np.ndarray  # numeric fields' values when absent (NaN: required)
    cols: list[int]  # union columns of the features
    ones: list[int]  # the intercept columns
    k: int  # union columns
    w_at: int  # the weight's numeric column (the response is just before it)
