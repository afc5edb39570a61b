"""Group keys: validation and the one unambiguous text encoding used by every export.

A group key is a ``str`` or an ``int``. The int ``1`` and the string ``"1"`` are
different groups, so every place where a key leaves Python as text (JSON summaries,
the effects topic, the state topic, HTTP paths) writes it as its JSON literal: ``1``
for the int, ``"1"`` for the string.

"""

from __future__ import annotations

import json
import math
import re

import numpy as np

__all__ = [
    "check_key",
    "key_to_json",
    "key_from_json",
    "key_label",
    "text_problem",
    "UnknownGroupError",
    "unknown_group",
    "FALLBACKS",
    "check_fallback",
    "MAX_KEY_LEN",
]

MAX_KEY_LEN = 256
FALLBACKS = ("population",)
_INT_TEXT = re.compile(r"-?[0-9]{1,19}")


def text_problem(s: str) -> str | None:
    r"""Why ``s`` is not valid Unicode text, or ``None`` if it is.

    A Python ``str`` can hold a lone surrogate (``"\ud800"`` in JSON decodes to one),
    which no UTF-8 encoder, JSON writer or font accepts: such a key or factor level is
    refused where it comes in, instead of breaking every export later.

    >>> text_problem("café") is None
    True
    >>> text_problem("a\ud800")
    'it is not valid Unicode text (a lone surrogate, U+D800, at character 1)'

    """
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"it is not valid Unicode text (a lone surrogate, U+{ord(s[e.start]):04X}, "
            f"at character {e.start})"
        )
    return None


def check_key(key: object, field: str = "group") -> str | int:
    r"""Validate a group key: a string or an integer (bool is not a group key).

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
    >>> check_key("\ud800", "g")
    Traceback (most recent call last):
    ...
    ValueError: field 'g': group key '\\ud800' is refused: it is not valid Unicode text (a lone ...

    """
    if type(key) is int:
        return key
    if key is None:
        raise ValueError(f"field {field!r}: group key is missing")
    if isinstance(key, str):
        if len(key) > MAX_KEY_LEN:
            raise ValueError(f"field {field!r}: group key longer than {MAX_KEY_LEN} characters")
        if not key.isascii():
            why = text_problem(key)
            if why is not None:
                raise ValueError(f"field {field!r}: group key {key_label(key)!r} is refused: {why}")
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
    r"""The JSON literal of a key: the int and the string of the same digits differ.

    A key that is not valid Unicode text (a lone surrogate, from data stored before such
    keys were refused) is written with ASCII escapes, which JSON allows and which read
    back to the same key.

    >>> key_to_json(1), key_to_json("1"), key_to_json("é"), key_to_json("\ud800")
    ('1', '"1"', '"é"', '"\\ud800"')

    """
    text = json.dumps(key, ensure_ascii=False)
    if not text.isascii() and text_problem(text) is not None:
        return json.dumps(key)
    return text


def key_label(key: str | int) -> str:
    r"""A key as printable text (summaries, plots, messages): the key itself, with any
    lone surrogate written as its escape ``\udXXX``.

    >>> key_label(3), key_label("café"), key_label("a\ud800")
    ('3', 'café', 'a\\ud800')

    """
    if type(key) is str and not key.isascii() and text_problem(key) is not None:
        return key.encode("utf-8", "backslashreplace").decode("utf-8")
    return str(key)


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


class UnknownGroupError(KeyError):
    """A lookup of a group the model has not seen (a ``KeyError``, so ``except
    KeyError`` catches it); its text is the message, without ``KeyError``'s quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_fallback(fallback: str | None) -> bool:
    """Whether a lookup falls back to the population (``fallback="population"``) for an
    unseen group; ``ValueError`` for any other value but ``None``.

    >>> check_fallback(None), check_fallback("population")
    (False, True)

    """
    if fallback is None:
        return False
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be None or 'population', got {fallback!r}")
    return True


def unknown_group(key: object, known, n_groups: int) -> UnknownGroupError:
    """The error of a lookup of ``key`` among ``known`` keys (anything with ``in``),
    suggesting the key of the other type when the int and the string of the same digits
    are confused.

    >>> print(unknown_group(17, {"17", "a"}, 2))
    unknown group 17 (an int); the snapshot has the string '17': an int and a str are ...
    >>> print(unknown_group("nope", {"17"}, 1))
    unknown group 'nope': not among the 1 groups (pass fallback="population" for the ...

    """
    hint = 'pass fallback="population" for the population\'s values'
    other = None
    if type(key) is int and str(key) in known:
        other = f"the string {str(key)!r}"
    elif type(key) is str and _INT_TEXT.fullmatch(key) and int(key) in known:
        other = f"the int {int(key)}"
    if other is not None:
        what = "an int" if type(key) is int else "a str"
        return UnknownGroupError(
            f"unknown group {_shown(key)} ({what}); the snapshot has {other}: an int "
            f"and a str are different groups (or {hint})"
        )
    return UnknownGroupError(
        f"unknown group {_shown(key)}: not among the {n_groups:,} groups ({hint})"
    )


def _shown(key: object) -> str:
    """A key in a message: the int as it is, a string quoted (a lone surrogate escaped)."""
    if type(key) is str:
        return repr(key_label(key))
    return repr(key)[:300]
