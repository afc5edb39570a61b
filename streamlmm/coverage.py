"""Which events of which source a snapshot holds, and whether snapshots overlap.

A snapshot of an engine records, per source partition, the next offset that is *not*
in its statistics (docs/design.md §5): it holds that partition's events ``[0, offset)``
as the engine read them from the partition's start. A JSON-lines source has one
partition (``jsonl:0``, the line count) and is told apart by the identity the snapshot
records (``meta["source_identity"]``: path, device/inode); a Kafka partition by its
``topic:partition`` name; the scale-out fitter records the partitions of its state.

Two snapshots that both hold events of one partition overlap: merging them would count
those events twice (:meth:`streamlmm.MixedLM.from_snapshots` refuses). A snapshot that
records no offsets (made in Python without ``offsets=``) cannot be checked: it merges
only when the caller says that the snapshots hold disjoint events.

>>> from streamlmm.snapshot import Snapshot
>>> def snap(offsets, **meta):
...     return Snapshot(formula="y ~ x + (1 | g)", method="REML", fixef={}, fixef_se={},
...         re_cov=[0.0], sigma=1.0, theta=[0.0], criterion=0.0, n_obs=1.0, singular=False,
...         converged=True, n_events=1, keys=[], b=[], condvar=[], offsets=offsets, meta=meta)
>>> check_disjoint([snap({"events:0": 10, "events:1": 0}), snap({"events:1": 7})])
>>> check_disjoint([snap({"events:0": 10}), snap({"events:0": 12})])
Traceback (most recent call last):
...
ValueError: snapshots 0 and 1 both hold events of Kafka partition 'events:0' (up to offsets
10 and 12): merged, those events would be counted twice. ...

"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_disjoint", "held"]

JSONL = "jsonl:0"  # stream.sources.JsonlSource's one partition


def held(snap) -> list[tuple[str, str, tuple, int]]:
    """The partitions whose events ``snap`` holds: ``(name, what, identity, offset)``,
    with ``offset > 0``; two entries of the same ``identity`` hold the same events from
    the start. A JSON-lines file is identified by its path and by its device/inode (two
    entries naming either match), stdin by nothing more than being stdin."""
    ident = snap.meta.get("source_identity")
    out = []
    for name, off in snap.offsets.items():
        off = int(off)
        if off <= 0:
            continue
        if name == JSONL and isinstance(ident, Mapping) and ident.get("kind") == "file":
            path = str(ident.get("path"))
            out.append(
                (
                    name,
                    f"JSON-lines file {path}",
                    ("file", path, ident.get("dev"), ident.get("ino")),
                    off,
                )
            )
        elif name == JSONL and isinstance(ident, Mapping) and ident.get("kind") == "stdin":
            out.append((name, "JSON lines from stdin", ("stdin",), off))
        elif name == JSONL and not isinstance(ident, Mapping):
            out.append((name, "a JSON-lines source", ("jsonl",), off))
        else:
            out.append((name, f"Kafka partition {name!r}", ("kafka", name), off))
    return out


def _same(a: tuple, b: tuple) -> bool:
    if a[0] == "file" and b[0] == "file":
        return a[1] == b[1] or (a[2] is not None and (a[2], a[3]) == (b[2], b[3]))
    return a == b


def check_disjoint(snaps: Sequence[Any], disjoint: bool = False) -> None:
    """``ValueError`` unless the snapshots hold disjoint events (see the module's text);
    ``disjoint=True`` is the caller's word for it and skips the check."""
    if disjoint or len(snaps) < 2:
        return
    for i, s in enumerate(snaps):
        if s.n_events > 0 and not held(s):
            raise ValueError(
                f"snapshot {i} records no source offsets (it was not taken by an engine, "
                f"or with offsets=), so its events cannot be told apart from the others': "
                "pass disjoint=True if the snapshots hold disjoint events"
            )
    seen: list[tuple[int, str, str, tuple, int]] = []
    for i, s in enumerate(snaps):
        for _, what, ident, off in held(s):
            for j, _, _, ident2, off2 in seen:
                if j != i and _same(ident, ident2):
                    raise ValueError(
                        f"snapshots {j} and {i} both hold events of {what} (up to offsets "
                        f"{off2} and {off}): merged, those events would be counted "
                        "twice. Merge snapshots of disjoint partitions or sources; if these "
                        "are different sources that share the name (e.g. two Kafka "
                        "clusters), pass disjoint=True"
                    )
        seen.extend((i, name, what, ident, off) for name, what, ident, off in held(s))
