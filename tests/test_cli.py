"""The command line's manners: every user error is one line on stderr and exit 2, with
what failed said in words; a reader that stops reading is not an error; every option
has a help text."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM, Snapshot, SnapshotError
from streamlmm.simulate import scenario, to_jsonl

ENV = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLMM_")}
FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"


def cli(*args: str, timeout: float = 120, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamlmm", *args],
        capture_output=True,
        env=ENV if env is None else env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def user_error(p: subprocess.CompletedProcess) -> str:
    """The one line of a user error (exit 2, no traceback)."""
    err = p.stderr.decode()
    assert p.returncode == 2, (p.returncode, err[-2000:])
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("streamlmm: error: "), err[-2000:]
    return lines[-1][len("streamlmm: error: ") :]


@pytest.fixture(scope="module")
def snapdir(tmp_path_factory):
    """A snapshot of the basic simulation, and its truth."""
    d = tmp_path_factory.mktemp("cli")
    sim = scenario("basic", 3000, seed=3, n_groups=60)
    X = pd.DataFrame(sim.events)
    m = MixedLM(FORMULA)
    m.learn_many(X[["g", "x1", "x2"]], X["y"])
    m.fit().snapshot().save(d / "snaps")
    (d / "truth.json").write_text(json.dumps(sim.truth))
    return d


# -- serve -------------------------------------------------------------------------------------
def test_serve_of_a_missing_directory_exits_2_at_once(tmp_path):
    t0 = time.monotonic()
    p = cli("serve", "--snapshot-dir", str(tmp_path / "nope"), "--port", "0", timeout=60)
    assert "snapshot directory" in user_error(p) and "does not exist" in user_error(p)
    assert not (tmp_path / "nope").exists()
    assert time.monotonic() - t0 < 30  # not waiting for a snapshot to appear
    afile = tmp_path / "f"
    afile.write_text("x")
    assert "is not a directory" in user_error(cli("serve", "--snapshot-dir", str(afile)))


@pytest.mark.parametrize("how", ["serve", "workers", "run --serve"])
def test_an_address_in_use_is_one_line_and_exit_2(snapdir, tmp_path, how):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        if how == "run --serve":
            src = tmp_path / "e.jsonl"
            src.write_text("".join(to_jsonl(scenario("basic", 50, n_groups=5).events)))
            p = cli(
                "run", "--source", f"jsonl:{src}", "--formula", FORMULA, "--snapshot-dir",
                str(tmp_path / "s"), "--until-end", "--serve", port,
            )  # fmt: skip
        else:
            extra = ["--workers", "2"] if how == "workers" else []
            p = cli("serve", "--snapshot-dir", str(snapdir / "snaps"), "--port", port, *extra)
        assert user_error(p) == f"listening on 127.0.0.1:{port}: Address already in use"
        assert b"ERROR:" not in p.stderr  # nothing in uvicorn's own format


@pytest.mark.parametrize(
    "args, words",
    [
        (["--port", "70000"], "port must be between 0 and 65535, got 70000"),
        (["--host", "no-such-host.invalid"], "host 'no-such-host.invalid' does not resolve"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--poll-seconds", "0"], "--poll-seconds must be > 0"),
    ],
)
def test_serve_settings_are_checked(snapdir, args, words):
    assert words in user_error(cli("serve", "--snapshot-dir", str(snapdir / "snaps"), *args))


# -- simulate ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["--events", "-5"], "number of events must be a positive integer, got -5"),
        (["--events", "0"], "number of events must be a positive integer, got 0"),
        (["--groups", "0"], "number of groups must be a positive integer, got 0"),
        (["--seed", "-1"], "seed must be an integer >= 0, got -1"),
        (["--events", "5", "--rate", "0"], "--rate must be > 0 events per second"),
        (["--events", "5", "--to", "jsonl:"], "--to jsonl: needs a path"),
    ],
)
def test_simulate_refuses_what_it_cannot_simulate(args, words):
    p = cli("simulate", *args)
    assert words in user_error(p) and p.stdout == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_says_what_was_being_written(tmp_path):
    p = cli("simulate", "--events", "50", "--to", "/dev/full", "--truth", str(tmp_path / "t.json"))
    assert user_error(p) == "writing events to /dev/full: No space left on device"
    src = tmp_path / "e.jsonl"
    src.write_text("".join(to_jsonl(scenario("basic", 200, n_groups=5).events)) + "[]\n" * 5)
    p = cli(
        "run", "--source", f"jsonl:{src}", "--formula", FORMULA, "--snapshot-dir",
        str(tmp_path / "s"), "--until-end", "--dead-letter", "jsonl:/dev/full",
    )  # fmt: skip
    assert user_error(p) == "writing dead letters to /dev/full: No space left on device"
    assert p.stderr.count(b"/dev/full") == 1
    p = cli(
        "run", "--source", f"jsonl:{src}", "--formula", FORMULA, "--snapshot-dir",
        str(tmp_path / "s2"), "--until-end", "--dead-letter", "jsonl:/dev/null",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr  # a device takes no fsync, and needs none


# -- summary and plot -----------------------------------------------------------------------------
def test_a_reader_that_stops_reading_is_not_an_error(tmp_path):
    m = MixedLM("y ~ x + (1 | g)")
    rng = np.random.default_rng(0)
    n = 20_000
    X = pd.DataFrame({"g": rng.integers(0, 4000, n), "x": rng.normal(size=n)})
    m.learn_many(X, pd.Series(rng.normal(size=n)))
    m.fit().snapshot().save(tmp_path)
    for extra in (["--json"], []):  # far more than a pipe holds
        p = subprocess.Popen(
            [sys.executable, "-m", "streamlmm", "summary", str(tmp_path), "--groups", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        p.stdout.read(100)  # `| head -c 100`
        p.stdout.close()
        err = p.stderr.read()
        p.stderr.close()
        assert p.wait(60) == 0 and err == b"", err


def test_vs_truth_refuses_another_simulation_s_truth(snapdir, tmp_path):
    snaps, truth = str(snapdir / "snaps"), snapdir / "truth.json"
    assert cli("summary", snaps, "--vs-truth", str(truth)).returncode == 0
    web = tmp_path / "web.json"
    web.write_text(json.dumps(scenario("web").truth))
    words = user_error(cli("summary", snaps, "--vs-truth", str(web)))
    assert words.startswith(f"--vs-truth {web}: the truth is of scenario 'web'")
    assert "response 'bounce' and groups 'county', not the snapshot's 'y' and 'g'" in words
    small = tmp_path / "small.json"
    small.write_text(json.dumps(scenario("basic", 1000, seed=3, n_groups=60).truth))
    assert "another simulation's truth" in user_error(
        cli("summary", snaps, "--vs-truth", str(small))
    )
    other = tmp_path / "other.json"
    t = scenario("basic", 5000, n_groups=60).truth
    t["groups"] = {f"h{k}": v for k, v in t["groups"].items()}
    other.write_text(json.dumps(t))
    assert "none of the snapshot's groups" in user_error(
        cli("summary", snaps, "--vs-truth", str(other))
    )
    notjson = tmp_path / "e.jsonl"
    notjson.write_text('{"a": 1}\n{"a": 2}\n')
    assert "not a truth file (JSON)" in user_error(
        cli("summary", snaps, "--vs-truth", str(notjson))
    )


def test_one_snapshot_file_opens_as_the_directory_does(snapdir, tmp_path):
    (path,) = (snapdir / "snaps").glob("snapshot-*.slmm")
    snap = Snapshot.load(path)
    assert snap.fixef == Snapshot.load(snapdir / "snaps").fixef
    p = cli("summary", str(path))
    assert p.returncode == 0 and b"Number of obs: 3000" in p.stdout
    bad = tmp_path / "bad.slmm"
    bad.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(SnapshotError, match=f"{bad}: snapshot checksum mismatch"):
        Snapshot.load(bad)
    assert "bad.slmm: snapshot checksum mismatch" in user_error(cli("summary", str(bad)))
    with pytest.raises(FileNotFoundError, match="no snapshot directory or file"):
        Snapshot.load(tmp_path / "nope")


def test_plot_into_a_file_or_nowhere_says_so(snapdir, tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    snaps = str(snapdir / "snaps")
    words = user_error(cli("plot", snaps, "--out", str(afile)))
    assert words == f"picture directory {afile} is a file, not a directory"
    words = user_error(cli("plot", snaps, "--out", str(afile / "sub")))
    assert words.startswith(f"creating the picture directory {afile / 'sub'}: ")


# -- run settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, words",
    [
        (["--consumer-group", " "], "--consumer-group must not be empty"),
        (["--levels", "{"], "--levels is not valid JSON"),
        (["--half-life", "inf"], "--half-life must be a finite number > 0, got inf"),
        (["--serve", "70000"], "--serve must be a port between 0 and 65535, got 70000"),
        (["--progress-seconds", "-1"], "--progress-seconds must be >= 0, got -1.0"),
        (["--state-topic", "st", "--until-end"], "--until-end applies to the engine, not to"),
        (["--state-topic", "st", "--session-timeout-ms", "0"], "--session-timeout-ms must be > 0"),
    ],
)
def test_run_settings_are_checked_before_anything_runs(snapdir, tmp_path, args, words):
    Snapshot.load(snapdir / "snaps").save(tmp_path / "s")  # a restart: --levels unused, yet read
    src = "kafka://127.0.0.1:1/t" if "--state-topic" in args else f"jsonl:{tmp_path / 'e.jsonl'}"
    p = cli(
        "run", "--source", src, "--formula", FORMULA, "--snapshot-dir", str(tmp_path / "s"), *args
    )
    assert words in user_error(p)


def test_every_option_of_every_command_has_a_help_text():
    from streamlmm.cli import _parser

    parser = _parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    missing = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.help is None and a.dest not in ("help",):
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert missing == []


# -- no broker ---------------------------------------------------------------------------------
NO_BROKER = "kafka://127.0.0.1:1"


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--source", f"{NO_BROKER}/events", "--kafka-client", "kafka-python"],
        ["run", "--source", f"{NO_BROKER}/events", "--kafka-client", "confluent-kafka"],
        ["run", "--source", f"{NO_BROKER}/events", "--state-topic", "state"],
        ["fit", "--state-topic", f"{NO_BROKER}/state"],
        ["serve", "--state-topic", f"{NO_BROKER}/state", "--params-topic", "params"],
        ["simulate", "--events", "5", "--to", f"{NO_BROKER}/events"],
    ],
    ids=["engine-kafka-python", "engine-confluent", "worker", "fitter", "serve", "simulate"],
)
def test_no_broker_is_one_line_that_says_so(tmp_path, args):
    extra = {
        "run": ["--formula", FORMULA, "--snapshot-dir", str(tmp_path / "s")],
        "fit": ["--snapshot-dir", str(tmp_path / "s")],
        "serve": ["--port", "0"],
    }.get(args[0], [])
    env = dict(ENV, STREAMLMM_BROKER_WAIT_SECONDS="1")
    p = cli(*args, *extra, env=env)
    assert user_error(p) == "no broker at 127.0.0.1:1: Connection refused (tried for 1 s)"
