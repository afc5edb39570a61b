"""The numba JSON scan: numbers exactly as Python's ``float``, keys as byte ranges."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamlmm.stream import jsonscan

NAMES = ["g", "x1", "x2", "y", "w"]
TABLE, OFFSETS = jsonscan.field_table(NAMES)
DEFAULTS = np.array([np.nan, np.nan, np.nan, 1.0])  # x1, x2, y required; w (last) 1


def scan(messages: list[bytes]):
    """Scan ``messages`` (laid end to end): numbers, key ranges, accepted."""
    n = len(messages)
    buf = np.frombuffer(b"".join(messages), np.uint8)
    starts = np.zeros(n + 1, np.int64)
    np.cumsum([len(m) for m in messages], out=starts[1:])
    num, kpos, ok = np.empty((n, 4)), np.empty((n, 2), np.int64), np.empty(n, np.bool_)
    required = 0b1111  # the key and x1, x2, y
    jsonscan.scan(buf, starts, TABLE, OFFSETS, required, DEFAULTS, 256, 1e300, 3, num, kpos, ok)
    return num, kpos, ok, buf


def number_strings(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = [repr(float(v)) for v in rng.normal(size=3000) * 10.0 ** rng.integers(-300, 300, 3000)]
    out += [repr(float(v)) for v in rng.uniform(-1, 1, 2000)]
    digits = rng.integers(1, 20, 3000)
    out += [
        ("-" if s else "") + str(int(m))[:d] + (f"e{e}" if e else "")
        for m, d, e, s in zip(
            rng.integers(1, 10**18, 3000),
            digits,
            rng.integers(-40, 40, 3000),
            rng.integers(0, 2, 3000),
        )
    ]
    out += [
        f"0.{'0' * int(z)}{int(m)}"
        for z, m in zip(rng.integers(0, 12, 1000), rng.integers(1, 10**15, 1000))
    ]
    return out


EDGES = [
    "0", "-0", "0.0", "-0.0", "1", "-1", "1e22", "1e23", "9007199254740993",
    "9007199254740992", "1.7976931348623157e308", "2.2250738585072014e-308",
    "0.1", "0.2", "0.30000000000000004", "123456789012345678", "1234567890123456789",
    "5e-324", "1e-400", "1e400", "4.9406564584124654e-324", "2.5e-1", "1E5", "1e+5",
]  # fmt: skip


@pytest.mark.parametrize("seed", range(3))
def test_numbers_are_parsed_exactly_as_python_float(seed):
    strings = number_strings(seed) + EDGES
    msgs = [f'{{"g": "k", "x1": {s}, "x2": 1, "y": 2}}'.encode() for s in strings]
    num, _, ok, _ = scan(msgs)
    other = []
    for s, v, accepted in zip(strings, num[:, 0], ok):
        want = float(json.loads(s))  # JSON: the integer -0 is 0
        if accepted:
            assert v == want and np.signbit(v) == np.signbit(want), s
            continue
        digits = s.lstrip("-").lower().split("e")[0].replace(".", "").lstrip("0")
        if not (abs(want) > 1e300 or 0 < abs(want) < 2.3e-308 or len(digits) > 19):
            other.append(s)  # the inputs Eisel-Lemire leaves undecided, or underflow to 0
    assert len(other) <= 0.005 * len(strings), other[:10]  # msgspec takes them
    # nearly every shortest repr of a normal double is decided
    normal = [
        i for i, s in enumerate(strings[:5000]) if 2.3e-308 < abs(float(json.loads(s))) <= 1e300
    ]
    assert ok[normal].mean() > 0.99


def test_keys_are_byte_ranges_and_bad_messages_are_declined():
    msgs = [
        b'{"g": "alpha", "x1": 1, "x2": 2, "y": 3}',
        b'  {"y":3,"x2":2,"x1":1,"g":"b","other":[1]}',  # nesting: declined
        b'{"y":3,"x2":2,"x1":1,"g":"b","s":"t","n":null,"t":true}',
        b'{"g": "a", "x1": 1, "x2": 2}',  # y missing
        b'{"g": "a", "x1": 1, "x2": 2, "y": 3, "x1": 4}',  # repeated
        b'{"g": 7, "x1": 1, "x2": 2, "y": 3}',  # an int key: the slower paths decide
        b'{"g": "a", "x1": "1", "x2": 2, "y": 3}',
        b'{"g": "a", "x1": 1, "x2": 2, "y": 3} x',
        b'{"g": "a\\"b", "x1": 1, "x2": 2, "y": 3}',  # an escape
        json.dumps({"g": "é", "x1": 1, "x2": 2, "y": 3}, ensure_ascii=False).encode(),
    ]
    num, kpos, ok, buf = scan(msgs)
    assert ok.tolist() == [True, False, True] + [False] * 7
    assert [buf[a:b].tobytes() for a, b in kpos[[0, 2]]] == [b"alpha", b"b"]
    np.testing.assert_array_equal(num[[0, 2], :3], [[1, 2, 3], [1, 2, 3]])
    assert num[0, 3] == 1.0  # the weight's default
