"""How a URL names a group key.

Group keys are ``str`` or ``int``, and the int ``1`` and the string ``"1"`` are
different groups (:mod:`streamlmm.keys`). A URL names them so:

* a segment that is a JSON string literal names that string: ``%22123%22`` (``"123"``)
  is the string ``"123"``; ``%22a%2Cb%22`` is the string ``"a,b"``;
* a segment of ASCII digits with an optional leading ``-`` names an int: ``123``,
  ``-4`` (within the signed 64-bit range);
* any other segment names the string as written (after percent-decoding): ``store-9``.

So only strings that look like integers, or that start with ``"``, need the quotes.
Segments are percent-decoded as UTF-8; bytes that are not UTF-8 are a bad request.
``keys=`` takes the same items separated by commas; a quoted item may contain commas.

"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote_to_bytes

from streamlmm.keys import MAX_KEY_LEN, check_key, text_problem

__all__ = ["parse_key", "parse_key_list", "decode_segment", "KeyError400", "INT_RE"]

INT_RE = re.compile(r"-?[0-9]+")
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_DECODER = json.JSONDecoder()


class KeyError400(ValueError):
    """A key in a URL that names no valid group key (a 400, not a 404)."""


def decode_segment(raw: bytes | str) -> str:
    """Percent-decode a raw URL segment as UTF-8 (strict).

    >>> decode_segment(b"caf%C3%A9"), decode_segment(b"a%2Fb")
    ('café', 'a/b')
    >>> decode_segment(b"%FF")
    Traceback (most recent call last):
    ...
    streamlmm.serve.paths.KeyError400: path is not valid UTF-8 after percent-decoding

    """
    if isinstance(raw, str):
        raw = raw.encode("latin-1", "strict")
    try:
        return unquote_to_bytes(raw).decode("utf-8", "strict")
    except UnicodeDecodeError as e:
        raise KeyError400("path is not valid UTF-8 after percent-decoding") from e


def parse_key(text: str) -> str | int:
    """The group key a (decoded) path segment or ``keys=`` item names.

    >>> parse_key("123"), parse_key('"123"'), parse_key("-7"), parse_key("store-9")
    (123, '123', -7, 'store-9')
    >>> parse_key('"a,b"'), parse_key("café")
    ('a,b', 'café')
    >>> parse_key("")
    Traceback (most recent call last):
    ...
    streamlmm.serve.paths.KeyError400: empty group key

    """
    if text == "":
        raise KeyError400("empty group key")
    if INT_RE.fullmatch(text):
        if len(text) > 20:
            raise KeyError400("integer group key out of the 64-bit range")
        k = int(text)
        if not _INT_MIN <= k <= _INT_MAX:
            raise KeyError400("integer group key out of the 64-bit range")
        return k
    if text.startswith('"'):
        try:
            k = json.loads(text)
        except ValueError as e:
            raise KeyError400(f"bad quoted group key {text[:80]!r}: {e}") from e
        if not isinstance(k, str):
            raise KeyError400(f"quoted group key {text[:80]!r} is not a JSON string")
        text = k
    if len(text) > MAX_KEY_LEN:
        raise KeyError400(f"group key longer than {MAX_KEY_LEN} characters")
    if not text.isascii() and text_problem(text) is not None:
        # a lone surrogate (quoted "\ud800"): no group learned now has such a key, but a
        # snapshot written before they were refused may; a lookup only reads
        return text
    try:
        return check_key(text)
    except ValueError as e:
        raise KeyError400(str(e)) from e


def parse_key_list(text: str, limit: int) -> list[str | int]:
    """Split a ``keys=`` value into keys; ``ValueError`` past ``limit`` keys.

    >>> parse_key_list('1,"1",a,"x,y"', 10)
    [1, '1', 'a', 'x,y']

    """
    out: list[str | int] = []
    i, n = 0, len(text)
    while True:
        if len(out) >= limit:
            raise OverflowError(f"more than {limit} keys")
        if i < n and text[i] == '"':
            try:
                _, end = _DECODER.raw_decode(text, i)
            except ValueError as e:
                raise KeyError400(f"bad quoted key at character {i}: {e}") from e
            item = text[i:end]
            if end < n and text[end] != ",":
                raise KeyError400(f"expected ',' after the quoted key at character {i}")
        else:
            end = text.find(",", i)
            end = n if end < 0 else end
            item = text[i:end]
        out.append(parse_key(item))
        if end >= n:
            return out
        i = end + 1
