"""Group keys: validation and the one unambiguous text encoding used by every export.

A group key is a ``str`` or an ``int``. The int ``1`` and the string ``"1"`` are
different groups, so every place where a key leaves Python as text (JSON summaries,
the effects topic, the state topic, HTTP paths) writes it as its JSON literal: ``1``
for the int, ``"1"`` for the string.

"""

from __future__ import annotations

import json
import math

import numpy as np

__all__ = ["check_key", "key_to_json", "key_from_json", "MAX_KEY_LEN"]

MAX_KEY_LEN = 256


def check_key(key: object, field: str = "group") -> str | int:
    """Validate a group key: a string or an integer (bool is not a group key).

    Integer-valued keys (``3``, ``np.int64(3)``, ``3.0``) are normalised to ``int``:
    they are equal as Python values, so they name the same group.

    >>> check_key("a"), check_key(3), check_key(3.0)
    ('a', 3, 3)
    >>> check_key(None)
    Traceback (most recent call last):
    ...
    ValueError: field 'group': group key is missing
    >>> check_key(1.5)
    Traceback (most recent call last):
    ...
    ValueError: field 'group': group key must be a str or an int, got float

    """
    if type(key) is int:
        return key
    if key is None:
        raise ValueError(f"field {field!r}: group key is missing")
    if isinstance(key, str):
        if len(key) > MAX_KEY_LEN:
            raise ValueError(f"field {field!r}: group key longer than {MAX_KEY_LEN} characters")
        return str(key)
    if isinstance(key, (bool, np.bool_)):
        raise ValueError(f"field {field!r}: group key must be a str or an int, got bool")
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, (float, np.floating)) and math.isfinite(key) and float(key).is_integer():
        return int(key)  # 3.0 == 3 in Python, so both name the same group
    raise ValueError(
        f"field {field!r}: group key must be a str or an int, got {type(key).__name__}"
    )


def key_to_json(key: str | int) -> str:
    """The JSON literal of a key: the int and the string of the same digits differ.

    >>> key_to_json(1), key_to_json("1"), key_to_json("é")
    ('1', '"1"', '"é"')

    """
    return json.dumps(key, ensure_ascii=False)


def key_from_json(text: str | bytes) -> str | int:
    """Inverse of :func:`key_to_json`; ``ValueError`` for anything but a str or int literal.

    >>> key_from_json('1'), key_from_json('"1"')
    (1, '1')

    """
    try:
        key = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"group key {text!r} is not a JSON string or integer") from e
    if type(key) not in (str, int):
        raise ValueError(f"group key {text!r} is not a JSON string or integer")
    return check_key(key)
