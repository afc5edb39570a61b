"""Restarts that never silently drop or double-count, and the command line's manners.

- a JSON-lines file replaced by a different or shorter one is refused (exit 2), a file
  that only grew is resumed, and ``--new-source`` learns a new file on top;
- stdin must replay the consumed stream from its start: a different stream is refused,
  the same stream continues after its prefix, ``--new-source`` appends a new one;
- the dead-letter file is cut back to the restored snapshot's length;
- ``python -m streamlmm``, ``--version``, help with defaults, one-line user errors, and
  read-only commands that create nothing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamlmm import MixedLM
from streamlmm.formula import parse_formula
from streamlmm.simulate import simulate
from streamlmm.store import LocalStore
from streamlmm.stream.decode import Decoder, Record

FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLMM_")}


def cli(
    *args: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamlmm", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=ENV,
        timeout=timeout,
    )


def events(n: int, seed: int) -> list[dict]:
    out = list(simulate(n, 50, seed=seed))
    for e in out:
        del e["ts"]
    return out


def lines(evs: list[dict]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in evs)


def run(source: str, snap: Path, *extra: str, stdin: bytes | None = None):
    return cli(
        "run", "--source", source, "--formula", FORMULA, "--snapshot-dir", str(snap),
        "--progress-seconds", "0", "--until-end", *extra, stdin=stdin,
    )  # fmt: skip


def n_events(snap: Path) -> int:
    return LocalStore(snap).latest().n_events


def assert_refused(p: subprocess.CompletedProcess, what: bytes) -> None:
    assert p.returncode == 2, p.stderr.decode()[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(b"streamlmm: error:") and what in last, last
    assert b"--new-source" in last and b"Traceback" not in p.stderr


# -- JSON-lines files -----------------------------------------------------------------------
def test_changed_or_shorter_file_is_refused_and_a_grown_one_resumed(tmp_path):
    a, b = events(3000, 1), events(3000, 2)
    src, snap = tmp_path / "e.jsonl", tmp_path / "snap"
    src.write_bytes(lines(a[:2000]))
    assert run(f"jsonl:{src}", snap).returncode == 0 and n_events(snap) == 2000

    src.write_bytes(lines(b))  # same path, other (longer) content
    assert_refused(run(f"jsonl:{src}", snap), b"sha256 mismatch")
    src.write_bytes(lines(a[:1500]))  # the consumed file, shortened
    assert_refused(run(f"jsonl:{src}", snap), b"shorter")
    assert n_events(snap) == 2000  # nothing learned from either

    os.remove(src)  # a new inode with the consumed prefix, then more: only the rest is new
    src.write_bytes(lines(a))
    assert run(f"jsonl:{src}", snap).returncode == 0 and n_events(snap) == 3000

    other = tmp_path / "other.jsonl"
    other.write_bytes(lines(b))
    assert run(f"jsonl:{other}", snap, "--new-source").returncode == 0
    final = LocalStore(snap).latest()
    assert final.n_events == 6000 and final.offsets == {"jsonl:0": 3000}
    mem = MixedLM(FORMULA)
    for e in a + b:
        mem.learn_one({k: e[k] for k in ("g", "x1", "x2")}, e["y"])
    want = mem.fit().snapshot()
    assert final.criterion == pytest.approx(want.criterion, rel=1e-6)
    for k, v in want.fixef.items():
        assert final.fixef[k] == pytest.approx(v, rel=1e-5)


def test_stdin_must_replay_its_consumed_prefix(tmp_path):
    a, b = events(2000, 3), events(2000, 4)
    snap = tmp_path / "snap"
    assert run("jsonl:-", snap, stdin=lines(a[:1000])).returncode == 0
    assert n_events(snap) == 1000

    assert_refused(run("jsonl:-", snap, stdin=lines(b)), b"sha256 mismatch")  # another stream
    assert_refused(run("jsonl:-", snap, stdin=lines(a[:500])), b"shorter")  # ends in the prefix
    assert n_events(snap) == 1000

    assert run("jsonl:-", snap, stdin=lines(a)).returncode == 0  # replayed: the rest is new
    assert n_events(snap) == 2000
    assert run("jsonl:-", snap, "--new-source", stdin=lines(b)).returncode == 0
    assert n_events(snap) == 4000


def test_dead_letter_file_is_cut_back_to_the_restored_snapshot(tmp_path):
    evs = events(1000, 5)
    body = lines(evs).splitlines(keepends=True)
    for i in range(0, 1000, 50):
        body[i] = b'{"g": "a", "x1": "bad"}\n'
    src, snap, dead = tmp_path / "e.jsonl", tmp_path / "snap", tmp_path / "dead.jsonl"
    src.write_bytes(b"".join(body))
    assert run(f"jsonl:{src}", snap, "--dead-letter", str(dead)).returncode == 0
    good = dead.read_bytes()
    assert len(good.splitlines()) == 20
    with open(dead, "ab") as fh:  # as if a killed run had written past its last snapshot
        fh.write(b'{"reason": "written after the snapshot"}\n')
    assert run(f"jsonl:{src}", snap, "--dead-letter", str(dead)).returncode == 0
    assert dead.read_bytes() == good


def test_a_restart_from_nothing_leaves_exactly_the_stream_s_dead_letters(tmp_path):
    """Every snapshot corrupt: the engine starts from offset 0 again, and the file must
    hold the 20 dead letters once, not 40; so too after a crash before any snapshot."""
    evs = events(1000, 5)
    body = lines(evs).splitlines(keepends=True)
    for i in range(0, 1000, 50):
        body[i] = b'{"g": "a", "x1": "bad"}\n'
    src, snap, dead = tmp_path / "e.jsonl", tmp_path / "snap", tmp_path / "dead.jsonl"
    src.write_bytes(b"".join(body))
    assert run(f"jsonl:{src}", snap, "--dead-letter", str(dead)).returncode == 0
    good = dead.read_bytes()
    assert len(good.splitlines()) == 20
    for f in snap.glob("snapshot-*.slmm"):
        f.write_bytes(b"garbage")
    p = run(f"jsonl:{src}", snap, "--dead-letter", str(dead))
    assert p.returncode == 0, p.stderr
    assert dead.read_bytes() == good
    assert LocalStore(snap).latest().meta["dead_letters"] == 20
    # as if a run had died before its first snapshot: no snapshot, dead letters written
    shutil.rmtree(snap)
    with open(dead, "ab") as fh:
        fh.write(b'{"reason": "written by a run that died before any snapshot"}\n')
    p = run(f"jsonl:{src}", snap, "--dead-letter", str(dead))
    assert p.returncode == 0 and dead.read_bytes() == good
    assert b"emptied" in p.stderr and b"no snapshot in" in p.stderr


def test_a_fresh_run_writes_no_empty_snapshot_and_prints_no_source_lines(tmp_path):
    src, snap = tmp_path / "e.jsonl", tmp_path / "snap"
    src.write_bytes(lines(events(300, 9)))
    p = run(f"jsonl:{src}", snap, "--dead-letter", str(tmp_path / "dead.jsonl"))
    assert p.returncode == 0, p.stderr
    files = sorted(snap.glob("snapshot-*.slmm"))
    assert len(files) == 1 and LocalStore(snap).latest().n_events == 300  # no empty one first
    assert b"0 level" not in p.stderr and b"snap = self" not in p.stderr, p.stderr
    # a warning the CLI prints is one line: no file name, no Python source line
    few = tmp_path / "few.jsonl"
    few.write_bytes(lines(events(300, 9)[:3]))
    p = run(f"jsonl:{few}", tmp_path / "snap2")
    err = p.stderr.decode()
    assert p.returncode == 0 and "FitWarning: " in err, err
    assert ".py:" not in err and "  snap = " not in err and "warnings.warn" not in err, err
    # an empty source writes nothing at all
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    p = run(f"jsonl:{empty}", tmp_path / "snap3")
    assert p.returncode == 0 and not list((tmp_path / "snap3").glob("snapshot-*"))
    assert b"FitWarning" not in p.stderr


def test_a_key_that_is_not_valid_unicode_is_a_dead_letter_and_the_rest_is_learned(tmp_path):
    evs = events(300, 7)
    body = lines(evs).splitlines(keepends=True)
    body[100] = b'{"g": "\\ud800", "x1": 1, "x2": 2, "y": 3}\n'  # JSON's escape of a lone surrogate
    body[200] = b'{"g": "a\\udc00", "x1": 1, "x2": 2, "y": 3}\n'
    src, snap, dead = tmp_path / "e.jsonl", tmp_path / "snap", tmp_path / "dead.jsonl"
    src.write_bytes(b"".join(body))
    assert run(f"jsonl:{src}", snap, "--dead-letter", str(dead)).returncode == 0
    letters = [json.loads(x) for x in dead.read_text().splitlines()]
    assert [d["offset"] for d in letters] == [100, 200]
    assert all("not valid Unicode text (a lone surrogate" in d["reason"] for d in letters)
    s = LocalStore(snap).latest()
    assert s.n_events == 298 and all(isinstance(k, int) or k.isprintable() for k in s.keys)
    js = cli("summary", str(snap), "--groups", "--json")
    assert js.returncode == 0 and len(json.loads(js.stdout)["groups"]) == s.n_groups


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_a_utf8_bom_at_the_start_of_the_stream_is_skipped(tmp_path, how):
    evs = events(200, 8)
    data = b"\xef\xbb\xbf" + lines(evs)  # as some editors save a file
    src, snap, dead = tmp_path / "e.jsonl", tmp_path / "snap", tmp_path / "dead.jsonl"
    src.write_bytes(data)
    source, stdin = (f"jsonl:{src}", None) if how == "file" else ("jsonl:-", data)
    p = run(source, snap, "--dead-letter", str(dead), stdin=stdin)
    assert p.returncode == 0, p.stderr
    assert dead.read_bytes() == b"" and n_events(snap) == 200
    mem = MixedLM(FORMULA)
    for e in evs:
        mem.learn_one({k: e[k] for k in ("g", "x1", "x2")}, e["y"])
    want = mem.fit().snapshot()
    assert LocalStore(snap).latest().criterion == pytest.approx(want.criterion, rel=1e-9)


def test_only_dead_letters_is_a_user_error_that_snapshots_nothing(tmp_path):
    """--half-life without a ts field: every event is a dead letter. The run stops with
    exit 2 and the reason, and no snapshot says those events were consumed, so the run
    with the right settings learns them all."""
    evs = events(200, 10)  # no "ts"
    src, snap, dead = tmp_path / "e.jsonl", tmp_path / "snap", tmp_path / "dead.jsonl"
    src.write_bytes(lines(evs))
    p = run(f"jsonl:{src}", snap, "--half-life", "100")
    err = p.stderr.decode().strip().splitlines()
    assert p.returncode == 2 and err[-1].startswith("streamlmm: error: all 200 events read"), err
    assert "200 dead letters: field 'ts': missing" in err[-1]
    assert sum("dead letter jsonl" in e for e in err) == 20  # then only counted
    assert not list(snap.glob("snapshot-*"))
    p = run(f"jsonl:{src}", snap, "--dead-letter", str(dead))
    assert p.returncode == 0 and n_events(snap) == 200 and dead.read_bytes() == b""


def test_a_misspelled_time_key_stops_at_the_first_thousand_events(tmp_path):
    evs = events(3000, 11)
    for i, e in enumerate(evs):
        e["ts"] = float(i)
    src, snap, dead = tmp_path / "e.jsonl", tmp_path / "snap", tmp_path / "dead.jsonl"
    src.write_bytes(lines(evs))
    p = run(
        f"jsonl:{src}", snap, "--time-key", "tss", "--dead-letter", str(dead),
        "--max-poll-records", "100", "--snapshot-every-events", "100",
    )  # fmt: skip
    last = p.stderr.decode().strip().splitlines()[-1]
    assert p.returncode == 2 and "the first 1,000 events read were all dead letters" in last
    assert "1,000 dead letters: field 'tss': missing" in last
    assert not list(snap.glob("snapshot-*"))  # no checkpoint while nothing was learned
    p = run(f"jsonl:{src}", snap, "--time-key", "ts", "--dead-letter", str(dead))
    assert p.returncode == 0 and n_events(snap) == 3000 and dead.read_bytes() == b""


@pytest.mark.parametrize("limit, code", [("1000", 2), ("2000", 0), ("0", 0)])
def test_the_dead_letter_stop_is_settable(tmp_path, limit, code):
    bad = b'{"g": "a", "x1": "bad"}\n' * 1500
    src, snap, dead = tmp_path / "e.jsonl", tmp_path / "snap", tmp_path / "dead.jsonl"
    src.write_bytes(bad + lines(events(500, 12)))
    p = run(
        f"jsonl:{src}", snap, "--dead-letter", str(dead), "--max-poll-records", "250",
        "--stop-after-dead-letters", limit,
    )  # fmt: skip
    assert p.returncode == code, p.stderr
    if code == 0:
        s = LocalStore(snap).latest()
        assert s.n_events == 500 and s.meta["dead_letters"] == 1500
        assert len(dead.read_bytes().splitlines()) == 1500
    env = dict(ENV, STREAMLMM_STOP_AFTER_DEAD_LETTERS="-1")
    p = subprocess.run(
        [sys.executable, "-m", "streamlmm", "run", "--source", f"jsonl:{src}", "--formula",
         FORMULA, "--snapshot-dir", str(tmp_path / "s2")],
        capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    assert p.returncode == 2 and b"--stop-after-dead-letters must be >= 0, got -1" in p.stderr


def test_one_engine_per_snapshot_directory_and_a_crash_frees_it(tmp_path):
    snap = tmp_path / "snap"
    evs = lines(events(500, 13))
    assert run("jsonl:-", snap, stdin=evs).returncode == 0
    cmd = [
        sys.executable, "-m", "streamlmm", "run", "--source", "jsonl:-", "--formula", FORMULA,
        "--snapshot-dir", str(snap), "--progress-seconds", "0",
    ]  # fmt: skip
    # a running engine: it holds the directory while it waits for its stream
    first = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 60
        lock = snap / ".lock"
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = run(f"jsonl:{tmp_path / 'other.jsonl'}", snap)
        last = second.stderr.strip().splitlines()[-1].decode()
        assert second.returncode == 2, second.stderr
        assert last.startswith(f"streamlmm: error: snapshot directory {snap} is in use by pid ")
        assert (
            f"pid {first.pid} (streamlmm run, since " in last and "another --snapshot-dir" in last
        )
        # readers need no lock
        summary = cli("summary", str(snap))
        assert summary.returncode == 0 and b"Number of obs: 500" in summary.stdout
    finally:
        first.kill()  # a crash: the operating system drops the lock
        first.wait(30)
        first.stdin.close()
        first.stderr.close()
    again = run("jsonl:-", snap, stdin=evs + lines(events(100, 14)))
    assert again.returncode == 0, again.stderr
    assert n_events(snap) == 600


def test_the_fitter_takes_its_snapshot_directory_too(tmp_path):
    from streamlmm.store import DirectoryLock

    held = DirectoryLock(tmp_path, "a test")
    try:
        p = cli(
            "fit", "--state-topic", "kafka://127.0.0.1:1/state", "--snapshot-dir", str(tmp_path),
            "--until-caught-up",
        )  # fmt: skip
        assert (
            p.returncode == 2 and b"is in use by pid" in p.stderr and b"(a test, since" in p.stderr
        )
    finally:
        held.close()


# -- the command line ---------------------------------------------------------------------------
def test_python_dash_m_version_and_help_with_defaults():
    from streamlmm import __version__

    v = cli("--version")
    assert v.returncode == 0 and v.stdout.decode().strip() == f"streamlmm {__version__}"
    h = cli("run", "--help")
    text = " ".join(h.stdout.decode().split())
    assert h.returncode == 0
    for flag in ("--source", "--formula", "--snapshot-dir"):
        assert flag in text
    assert text.count("[required]") == 3
    from streamlmm.stream.engine import EngineConfig

    every = EngineConfig.snapshot_every_events  # each default lives in one place
    its_help = text[text.index("--snapshot-every-events N snapshot") :]
    assert its_help[: its_help.index("--snapshot-every-seconds S")].endswith(f"(default: {every}) ")
    assert "(default: REML)" in text
    assert "--new-source" in text and "stdin" in text


def test_user_errors_are_one_line_and_read_only_commands_create_nothing(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    src = tmp_path / "e.jsonl"
    src.write_bytes(lines(events(10, 6)))
    for p in (
        run(f"jsonl:{src}", afile),  # --snapshot-dir is a file
        run(f"jsonl:{tmp_path / 'missing.jsonl'}", tmp_path / "s1"),
        cli("summary", str(tmp_path / "nope")),
        run(f"jsonl:{src}", tmp_path / "s2", "--snapshot-every-events", "0"),
    ):
        assert p.returncode == 2, p.stderr
        assert b"Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "nope").exists()
    from streamlmm import Snapshot

    with pytest.raises(FileNotFoundError):
        Snapshot.load(tmp_path / "nope2")
    assert not (tmp_path / "nope2").exists()


# -- the decoder's two paths agree --------------------------------------------------------------
def test_bulk_and_per_message_decoding_accept_and_reject_the_same():
    rng = random.Random(11)
    F = parse_formula(FORMULA)
    pieces = [
        '"g": "a"', '"g": 7', '"g": 7.0', '"g": true', '"g": null', '"g": "' + "k" * 300 + '"',
        '"x1": 1', '"x1": 1.5', '"x1": "1"', '"x1": NaN', '"x1": 1e400', '"x1": null',
        '"x2": -2', '"x2": false', '"y": 3', '"y": Infinity', '"w": 2', '"w": -1', '"w": null',
        '"z": [1, {"q": "\\u00e9"}]', '"x1": 2',
    ]  # fmt: skip
    base = ['"g": "a"', '"x1": 1', '"x2": 2.5', '"y": 3']
    msgs = []
    for _ in range(3000):  # a valid event with 0-2 fields dropped or replaced, in any order
        fields = list(base)
        for _ in range(rng.choice((0, 0, 1, 2))):
            fields[rng.randrange(len(fields))] = rng.choice(pieces + [""])
        rng.shuffle(fields)
        msgs.append(("{" + ", ".join(f for f in fields if f) + "}").encode())
    msgs += [b"", b"[1]", b"\xff", b'{"g": "a", "x1": 1, "x2": 2, "y": 3}' * 2, None]
    recs = [Record("t", 0, i, None, v) for i, v in enumerate(msgs)]
    for missing in ("raise", "skip"):
        bulk = Decoder(F, missing=missing).decode(recs)
        ref = Decoder(F, missing=missing)
        ref._fast = None  # the reference path only
        one = ref.decode(recs)
        assert bulk.keys == one.keys and [type(k) for k in bulk.keys] == [type(k) for k in one.keys]
        np.testing.assert_array_equal(bulk.A, one.A)
        np.testing.assert_array_equal(bulk.y, one.y)
        np.testing.assert_array_equal(bulk.w, one.w)
        assert [(d.record.offset, d.reason) for d in bulk.dead] == [
            (d.record.offset, d.reason) for d in one.dead
        ]
        assert len(bulk) > 100 and len(bulk.dead) > 100
