from __future__ import annotations

import json

import numpy as np
import pytest

from streamlmm.formula import parse_formula
from streamlmm.stream.decode import MAX_MESSAGE_BYTES, Decoder, Polled, Record

F = parse_formula("y ~ x1 + x2 + (1 + x1 | g)")


def rec(value: bytes | None, offset: int = 0) -> Record:
    return Record("t", 0, offset, None, value)


GOOD = {"g": "a", "x1": 1.5, "x2": -2.0, "y": 3.25}

BAD = {
    "bad json": b'{"g": "a", "x1": 1',
    "not an object": b"[1, 2, 3]",
    "empty": b"",
    "tombstone": None,
    "not utf8": b"\xff\xfe{}",
    "missing y": json.dumps({"g": "a", "x1": 1, "x2": 2}).encode(),
    "missing x2": json.dumps({"g": "a", "x1": 1, "y": 2}).encode(),
    "missing g": json.dumps({"x1": 1, "x2": 2, "y": 2}).encode(),
    "nan": b'{"g": "a", "x1": NaN, "x2": 1, "y": 2}',
    "inf": b'{"g": "a", "x1": Infinity, "x2": 1, "y": 2}',
    "string number": json.dumps({"g": "a", "x1": "1.0", "x2": 1, "y": 2}).encode(),
    "bool feature": json.dumps({"g": "a", "x1": True, "x2": 1, "y": 2}).encode(),
    "list group": json.dumps({"g": [1], "x1": 1, "x2": 1, "y": 2}).encode(),
    "float group": json.dumps({"g": 1.5, "x1": 1, "x2": 1, "y": 2}).encode(),
    "bool group": json.dumps({"g": True, "x1": 1, "x2": 1, "y": 2}).encode(),
    "negative weight": json.dumps({**GOOD, "w": -1}).encode(),
    "huge": json.dumps({**GOOD, "pad": "x" * MAX_MESSAGE_BYTES}).encode(),
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "lone surrogate group": b'{"g": "\\ud800", "x1": 1, "x2": 1, "y": 2}',
    "lone surrogate in a group": b'{"g": "a\\udfffb", "x1": 1, "x2": 1, "y": 2}',
}


def test_good_event_is_decoded_into_union_columns():
    b = Decoder(F).decode([rec(json.dumps({**GOOD, "w": 2}).encode())])
    assert b.keys == ["a"] and not b.dead
    np.testing.assert_array_equal(b.A, [[1.0, 1.5, -2.0]])
    assert b.y.tolist() == [3.25] and b.w.tolist() == [2.0] and b.t is None


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_event_is_a_dead_letter_with_a_reason(name):
    good = rec(json.dumps(GOOD).encode(), 0)
    b = Decoder(F).decode([good, rec(BAD[name], 1), good])
    assert len(b) == 2 and b.keys == ["a", "a"]
    assert len(b.dead) == 1
    d = b.dead[0]
    assert d.record.offset == 1 and d.reason
    env = json.loads(d.to_json())
    assert env["offset"] == 1 and env["reason"] == d.reason
    assert env["value_len"] == len(BAD[name] or b"")


def test_a_key_or_level_that_is_not_valid_unicode_is_a_dead_letter_naming_why():
    dec = Decoder("y ~ x1 + f + (1 | g)")
    values = [
        b'{"g": "a", "x1": 1, "f": "u", "y": 2}',
        b'{"g": "\\ud800", "x1": 1, "f": "u", "y": 2}',
        b'{"g": "b", "x1": 1, "f": "\\udfff", "y": 2}',
        b'{"g": "\\ud83d\\ude00", "x1": 1, "f": "\\u00e9", "y": 2}',  # a pair: one character
    ]
    b = dec.decode([rec(v, i) for i, v in enumerate(values)])
    assert b.keys == ["a", "\U0001f600"]
    assert [d.record.offset for d in b.dead] == [1, 2]
    assert (
        "field 'g': group key '\\\\ud800' is refused: it is not valid Unicode" in b.dead[0].reason
    )
    assert "field 'f': factor level '\\\\udfff' is refused" in b.dead[1].reason
    assert dec.design.to_state()["levels"] == {"f": ["u", "é"]}


def test_reason_names_the_field():
    b = Decoder(F).decode([rec(BAD["string number"]), rec(BAD["missing y"])])
    assert "'x1'" in b.dead[0].reason and "'y'" in b.dead[1].reason


def test_missing_skip_drops_and_counts():
    dec = Decoder(F, missing="skip")
    b = dec.decode([rec(BAD["missing x2"]), rec(BAD["nan"]), rec(BAD["string number"])])
    assert len(b) == 0 and dec.n_skipped == 2 and len(b.dead) == 1


def test_time_key_is_required_and_read():
    dec = Decoder(F, time_key="ts")
    b = dec.decode([rec(json.dumps({**GOOD, "ts": 7}).encode()), rec(json.dumps(GOOD).encode())])
    assert b.t.tolist() == [7.0] and "'ts'" in b.dead[0].reason


def test_integer_beyond_float_range_is_a_dead_letter_not_a_crash():
    b = Decoder(F).decode([rec(b'{"g": "a", "x1": 1' + b"0" * 400 + b', "x2": 1, "y": 1}')])
    assert len(b) == 0 and "'x1'" in b.dead[0].reason


# -- the bulk paths agree with the reference path -------------------------------------------
ODD = [
    b'{"g": "a", "x1": 0, "x2": -0, "y": -0.0}',
    b'{"x2": 1e5, "y": 2E-3, "g": "b", "x1": -1.5e+2}',
    b' {\t"g":"a" , "x1" :1,"x2":2,"y":3 }\n',
    b'{"g": "a", "x1": 1, "x2": 2, "y": 3, "w": 0}',
    b'{"g": "a", "x1": 1, "x2": 2, "y": 3, "w": 2.5}',
    b'{"g": "a", "x1": 1, "x2": 2, "y": 3, "w": null}',
    b'{"g": "a", "x1": 1, "x2": 2, "y": 3, "w": -0.5}',
    b'{"g": "a", "x1": 1e200, "x2": 2, "y": 3}',
    b'{"g": "a", "x1": 1e-320, "x2": 2, "y": 3}',
    b'{"g": "a", "x1": 12345678901234567890123, "x2": 2, "y": 3}',
    b'{"g": "a", "x1": 0.1234567890123456789012, "x2": 2, "y": 3}',
    b'{"g": "a", "x1": 01, "x2": 2, "y": 3}',
    b'{"g": "a", "x1": 1.e5, "x2": 2, "y": 3}',
    b'{"g": 7, "x1": 1, "x2": 2, "y": 3}',
    b'{"g": "7", "x1": 1, "x2": 2, "y": 3}',
    b'{"g": 7.0, "x1": 1, "x2": 2, "y": 3}',
    b'{"g": "\\u00e9t\\u00e9", "x1": 1, "x2": 2, "y": 3}',
    '{"g": "été", "x1": 1, "x2": 2, "y": 3}'.encode(),
    b'{"g": "a\\"b", "x1": 1, "x2": 2, "y": 3}',
    b'{"g": "' + b"k" * 300 + b'", "x1": 1, "x2": 2, "y": 3}',
    b'{"g": "a", "x1": 1, "x2": 2, "y": 3, "x1": 4}',
    b'{"g": "a", "x1": 1, "x2": 2, "y": 3, "meta": {"a": [1, 2]}, "s": "x\\ny", "b": true}',
    b'{"g": "a", "x1": 1, "x2": 2, "y": 3, "n": null, "f": false, "big": 1e999}',
    b'{"g": "a", "x1": 1, "x2": 2, "y": 3}  x',
    b'{"g": "a", "x1": 1, "x2": 2, "y": 3,}',
    b'{"g": "a", "x1": 1, "x2": 2}',
    b'{"g": "a", "x1": "1", "x2": 2, "y": 3}',
    b'{"g": "a", "x1": true, "x2": 2, "y": 3}',
    b"{}",
    b"[]",
    b"",
    None,
]


def reference_only(dec: Decoder) -> Decoder:
    dec._fast_decoders = lambda: None  # every message through the reference path
    return dec


NUL = b'{"g": "a", "x1": 1, "x2": 2, "y": 3}\x00'  # not JSON: a NUL byte after it

# which odd messages a poll holds: with a tombstone, an empty message or one holding a
# NUL the decoder cannot take the poll as one NUL-separated buffer; without, it does
ODD_SETS = {
    "all": [*ODD, NUL],
    "NUL-separated": [v for v in ODD if v],
    "a NUL inside": [v for v in ODD if v] + [NUL],
}


def packed(records: list[Record]) -> Polled:
    """A poll as the librdkafka fetcher gives it: the values end to end in one buffer."""
    values = [r.value for r in records]
    lens = np.array([len(v or b"") for v in values], np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    buf = np.frombuffer(b"".join(v or b"" for v in values), np.uint8)
    return Polled(
        values.__getitem__,
        np.array([r.partition for r in records], np.int64),
        np.array([r.offset for r in records], np.int64),
        records.__getitem__,
        packed=(buf, starts),
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("time_key", [None, "ts"])
@pytest.mark.parametrize("odd_set", list(ODD_SETS))
@pytest.mark.parametrize("as_packed", [False, True], ids=["values", "packed"])
def test_bulk_paths_decode_exactly_as_the_reference_path(seed, time_key, odd_set, as_packed):
    rng = np.random.default_rng(seed)
    good = [
        json.dumps(
            {"g": f"g{i % 7}", "x1": float(v), "x2": int(i), "y": float(v) * 3, "ts": i}
        ).encode()
        for i, v in enumerate(rng.normal(size=60) * 10.0 ** rng.integers(-5, 5, 60))
    ]
    odd = ODD_SETS[odd_set]
    if time_key:
        odd = [v if v is None else v.replace(b'"y"', b'"ts": 1.5, "y"') for v in odd]
    values = good[:5] + [odd[i] for i in rng.permutation(len(odd))] + good[5:]
    records = [Record("t", i % 2, i, None, v) for i, v in enumerate(values)]
    fast, slow = Decoder(F, time_key=time_key), reference_only(Decoder(F, time_key=time_key))
    for part in (records[:20], records[20:]):
        a, b = fast.decode(packed(part) if as_packed else part), slow.decode(part)
        assert a.keys == b.keys and [type(k) for k in a.keys] == [type(k) for k in b.keys]
        np.testing.assert_array_equal(a.A, b.A)
        np.testing.assert_array_equal(np.signbit(a.A), np.signbit(b.A))
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.w, b.w)
        if time_key:
            np.testing.assert_array_equal(a.t, b.t)
        assert a.idx.tolist() == b.idx.tolist()
        assert [(d.record.offset, d.reason) for d in a.dead] == [
            (d.record.offset, d.reason) for d in b.dead
        ]
    assert fast.n_skipped == slow.n_skipped


def test_a_feature_beyond_the_limit_is_a_dead_letter_in_a_bulk_poll():
    dec = Decoder(F)
    good = json.dumps(GOOD).encode()
    dec.decode([rec(good)])  # the design knows its kinds: the next poll is bulk
    b = dec.decode([rec(good, 1), rec(b'{"g": "a", "x1": 1e300, "x2": 1, "y": 2}', 2)])
    assert len(b) == 1 and "'x1'" in b.dead[0].reason and b.dead[0].record.offset == 2


def test_key_codes_are_stable_across_polls():
    dec = Decoder(F)
    first = dec.decode([rec(json.dumps({**GOOD, "g": g}).encode()) for g in ["a", "b", "a"]])
    again = dec.decode([rec(json.dumps({**GOOD, "g": g}).encode()) for g in ["b", "c", "a"]])
    assert first.codes.tolist() == [0, 1, 0] and again.codes.tolist() == [1, 2, 0]
    assert again.uniques is first.uniques and again.keys == ["b", "c", "a"]


@pytest.mark.parametrize("n", [3, 300])  # a small poll, and one the bulk paths take
def test_weighted_overflows_become_dead_letters(n):
    """The engine's and the workers' batches refuse an event whose w·v² would overflow
    the statistics, with the model's words, and keep every other event."""
    good = [{**GOOD, "g": f"k{i}", "w": 2.0} for i in range(n)]
    bad = {**GOOD, "g": "big", "x2": 1e149, "w": 1e10}
    events = good[:1] + [bad] + good[1:]
    dec = Decoder(F)
    b = dec.decode([rec(json.dumps(e).encode(), i) for i, e in enumerate(events)])
    b.refuse_overflows(dec.design)
    assert b.keys == [e["g"] for e in good]
    assert [(d.record.offset, d.reason) for d in b.dead] == [
        (1, "field 'x2': weight 1e+10 × value² would overflow the statistics")
    ]


class FakeError:
    """A client error event's error (fault injection: a broker cannot be made to send
    these on demand)."""

    def __init__(self, fatal: bool = False):
        self._fatal = fatal

    def fatal(self) -> bool:
        return self._fatal

    def __str__(self) -> str:
        return "Broker: Offset out of range" + (" (fatal)" if self._fatal else "")


def poll_with_errors(errors: dict[int, FakeError], n: int = 40) -> tuple[Polled, list]:
    """A poll of ``n`` good events over partitions 0 and 1 in runs, with client error
    events (value: the error text, as librdkafka gives) at the positions of ``errors``."""

    parts = np.array([(i // 7) % 2 for i in range(n)], np.int64)
    offsets = np.array([100 * p + i for i, p in enumerate(parts.tolist())], np.int64)
    values = [
        json.dumps({"g": f"g{i % 5}", "x1": i * 0.5, "x2": 1.0, "y": i * 0.25}).encode()
        for i in range(n)
    ]
    for i in errors:
        values[i] = str(errors[i]).encode()
    recs = [Record("t", int(p), int(o), None, v) for p, o, v in zip(parts, offsets, values)]
    polled = Polled(values, parts, lambda: offsets, recs.__getitem__, errors.get)
    return polled, recs


@pytest.mark.parametrize("where", [[3], [39], [34, 39], [0, 20, 39]])
def test_client_error_events_are_neither_learned_nor_dead_letters(where):
    polled, recs = poll_with_errors({i: FakeError() for i in where})
    clean, _ = poll_with_errors({})
    dec = Decoder(F)
    dec.decode([rec(b'{"g": "a", "x1": 1, "x2": 2, "y": 3}')] * 20)  # bulk layout known
    batch = dec.decode(polled)
    assert batch.dead == []
    assert batch.idx.tolist() == [i for i in range(40) if i not in where]
    # each partition's next offset is after its last message that is not an error
    want = {}
    for i, r in enumerate(recs):
        if i not in where:
            want[r.partition] = r.offset + 1
    assert polled.last_offsets() == want
    assert clean.last_offsets() != want or not (set(where) & {34, 39})


def test_a_fatal_client_error_stops_the_decode():
    polled, _ = poll_with_errors({12: FakeError(fatal=True)})
    with pytest.raises(RuntimeError, match="kafka consumer: .*fatal"):
        Decoder(F).decode(polled)
