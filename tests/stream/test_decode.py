from __future__ import annotations

import json

import numpy as np
import pytest

from streamlmm.formula import parse_formula
from streamlmm.stream.decode import MAX_MESSAGE_BYTES, Decoder, Record

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
