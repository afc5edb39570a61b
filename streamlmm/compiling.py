"""Say when numba compiles one of streamlmm's kernels, instead of hanging silently.

streamlmm's kernels are compiled once per machine and numba caches them on disk
(``python -m streamlmm.warm``, which ``scripts/setup`` runs, fills the cache). A
process whose cache lacks a kernel (a fresh ``pip install``, a changed numba, a cache
directory that was wiped) compiles it on first use, which takes seconds to tens of
seconds. Whenever that happens, one line says so when it starts, in the log (logger
``streamlmm.compiling``, level WARNING, so it shows even where logging is not
configured) and to every listener registered with :func:`on_compile` (the engine's
progress output). Loading a kernel from the cache says nothing.

Examples
--------
>>> seen = []
>>> remove = on_compile(seen.append)
>>> remove()
>>> seen
[]

"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from numba.core import event

__all__ = ["on_compile", "compiled", "load_cached", "MESSAGE"]

log = logging.getLogger(__name__)

MESSAGE = (
    "compiling streamlmm's numba kernel {name} (once per machine, then cached; "
    "`python -m streamlmm.warm` compiles them all ahead of time)"
)

_listeners: list[Callable[[str], None]] = []
_lock = threading.Lock()
_compiled: list[tuple[str, float]] = []  # (kernel, seconds) compiled by this process
_announced = -math.inf  # when the last compile was announced (time.monotonic)
QUIET_S = 60.0


def on_compile(callback: Callable[[str], None]) -> Callable[[], None]:
    """Call ``callback(line)`` whenever a streamlmm kernel starts compiling; returns a
    function that removes it."""
    with _lock:
        _listeners.append(callback)

    def remove() -> None:
        with _lock:
            if callback in _listeners:
                _listeners.remove(callback)

    return remove


def compiled() -> list[tuple[str, float]]:
    """The kernels this process compiled (not loaded from the cache), with seconds."""
    with _lock:
        return list(_compiled)


def load_cached(*dispatchers) -> int:
    """Load every cached compilation of ``dispatchers`` (numba ``@njit(cache=True)``
    functions) now, so that no later call pays for it; returns how many were loaded.

    numba loads a kernel from its cache on the first call with a new signature: a few
    milliseconds each, and a third of a second for the first one in a process (numba's
    own start). A model loads what its calls need when it is built
    (:func:`streamlmm.kernels.preload`), so no single ``learn_one`` or ``predict_one``
    stalls. Nothing is compiled here: a signature that is not cached is left for its
    first call (which then announces its compile). numba's cache index is read through
    its internals; if they change, this loads nothing and the calls load lazily, as
    before.
    """
    from numba.core.compiler_lock import global_compiler_lock

    loaded = 0
    for d in dispatchers:
        with global_compiler_lock:
            loaded += _load_all(d)
    return loaded


def _load_all(d) -> int:
    """:func:`load_cached` for one dispatcher (under numba's compiler lock)."""
    try:
        cache = d._cache
        index = cache._cache_file._load_index()
        codegen = d.targetctx.codegen()
    except Exception:  # not a caching dispatcher, or numba's internals moved
        return 0
    loaded = 0
    for key in list(index):
        try:
            sig = key[0]
            if key != cache._index_key(sig, codegen) or tuple(sig) in d.overloads:
                continue  # another machine's, or stale, or loaded already
            cres = cache.load_overload(sig, d.targetctx)
            if cres is None:
                continue
            if not cres.objectmode:
                d.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            d.add_overload(cres)
            loaded += 1
        except Exception:
            continue
    return loaded


def _kernel_name(dispatcher) -> str | None:
    fn = getattr(dispatcher, "py_func", None)
    module = getattr(fn, "__module__", "") or ""
    if not module.startswith("streamlmm"):
        return None
    return f"{module.removeprefix('streamlmm.')}.{fn.__qualname__.replace('.<locals>', '')}"


class _Listener(event.Listener):
    """Announces the outermost compile of a streamlmm kernel on each thread (the
    kernels a kernel calls compile inside it and are not announced again)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def on_start(self, ev) -> None:
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth:
            return
        name = _kernel_name(ev.data.get("dispatcher"))
        self._local.current = (name, time.perf_counter())
        if name is None:
            return
        line = MESSAGE.format(name=name)
        global _announced
        now = time.monotonic()
        # one WARNING line for a run of compiles (the rest at INFO): enough to explain a wait
        log.log(logging.WARNING if now - _announced > QUIET_S else logging.INFO, line)
        _announced = now
        with _lock:
            listeners = list(_listeners)
        for cb in listeners:
            try:
                cb(line)
            except Exception:  # a listener's failure never breaks a compile
                log.debug("compile listener failed", exc_info=True)

    def on_end(self, ev) -> None:
        self._local.depth = getattr(self._local, "depth", 1) - 1
        if self._local.depth:
            return
        name, t0 = getattr(self._local, "current", (None, 0.0))
        if name is not None:
            seconds = time.perf_counter() - t0
            with _lock:
                _compiled.append((name, seconds))
            log.info("compiled %s in %.1f s", name, seconds)


event.register("numba:compile", _Listener())
