"""Operating-system errors that say what was being done.

``OSError``'s own text is the call's (``[Errno 28] No space left on device``, or
``[Errno 22] Invalid argument`` from an ``fsync`` of a device): true, but it does not
say which file, or what streamlmm was doing with it. :func:`doing` re-raises the same
kind of error with that said, and :func:`describe` is the one line a user reads.

"""

from __future__ import annotations

__all__ = ["doing", "describe"]


def doing(what: str, e: OSError) -> OSError:
    """``e`` as the same kind of ``OSError`` (same ``errno``), whose text starts with
    what was being done.

    >>> e = doing("writing dead letters to /dev/full", OSError(28, "No space left on device"))
    >>> describe(e), e.errno
    ('writing dead letters to /dev/full: No space left on device', 28)

    """
    why = e.strerror or str(e)
    if e.filename is not None and str(e.filename) not in what:
        why = f"{e.filename}: {why}"
    out = type(e)(e.errno, f"{what}: {why}")
    return out


def describe(e: BaseException) -> str:
    """An error as one line: an ``OSError`` without its ``[Errno N]`` prefix, with the
    file it names; anything else as its text (or its type when it has none).

    >>> describe(FileNotFoundError(2, "No such file or directory", "/x/y"))
    '/x/y: No such file or directory'
    >>> describe(ValueError("a\\nb"))
    'a b'

    """
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror if e.filename is None else f"{e.filename}: {e.strerror}"
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__
