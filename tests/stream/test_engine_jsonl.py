"""The engine on the JSON-lines source: exact state across kills, corrupt snapshots,
dead letters and signals (the Kafka versions of these live in test_engine_kafka.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamlmm import MixedLM, Snapshot, estimate
from streamlmm.simulate import simulate
from streamlmm.store import LocalStore
from streamlmm.stream.config import load_config
from streamlmm.stream.engine import Engine, EngineConfig

FORMULA = "y ~ x1 + x2 + (1 + x1 | g)"
# lme4's reference cases live in the repository (tests/data); STREAMLMM_REFERENCE overrides
REFERENCE = Path(
    os.environ.get("STREAMLMM_REFERENCE") or Path(__file__).resolve().parents[1] / "data"
)


def load_reference(name: str) -> dict:
    ref = json.loads((REFERENCE / f"{name}.json").read_text())
    ref["csv"] = REFERENCE / ref["data"]
    return ref


def run_cli(*args: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamlmm.cli", "run", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def engine_args(path: Path, snapdir: Path, *extra: str) -> list[str]:
    """``streamlmm run`` flags for FORMULA over a JSON-lines file, without progress."""
    return [
        "--source", f"jsonl:{path}", "--formula", FORMULA, "--snapshot-dir", str(snapdir),
        "--progress-seconds", "0", *extra,
    ]  # fmt: skip


def write_events(path: Path, events: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def run_to_end(src: Path, snapshot_dir: Path, formula: str = FORMULA, **kw) -> EngineConfig:
    """Run the engine in-process over a JSON-lines file to its end; returns its config."""
    cfg = EngineConfig(
        source=f"jsonl:{src}",
        formula=formula,
        snapshot_dir=str(snapshot_dir),
        until_end=True,
        progress_seconds=0,
        **kw,
    )
    Engine(cfg).run(install_signals=False)
    return cfg


def in_memory(events: list[dict]) -> MixedLM:
    df = pd.DataFrame(events)
    m = MixedLM(FORMULA)
    m.learn_many(df[["g", "x1", "x2"]], df["y"])
    return m


def assert_same_state(snap: Snapshot, events: list[dict]) -> None:
    """The snapshot's statistics equal one uninterrupted in-memory pass (1e-9 relative)."""
    ref = in_memory(events)
    st = ref._stats
    assert snap.n_obs == len(events) and snap.n_events == len(events)
    assert snap.n_groups == st.n_groups
    mine = dict(zip(snap.keys, snap.state["M"]))
    for key, row in zip(st.keys, st.active):
        assert mine[key][0] == row[0]  # n_g exactly
        np.testing.assert_allclose(mine[key], row, rtol=1e-9, atol=1e-9 * np.abs(row).max())
    resumed = MixedLM.from_snapshot(snap)._stats
    theta = np.array([0.8, 0.1, 0.3])
    zero = np.zeros(st.k + 1)  # both in the user's coordinates
    for reml in (True, False):
        a = estimate.make_problem(resumed, st.spec, reml, center=zero)[0].profile(theta)
        b = estimate.make_problem(st, st.spec, reml, center=zero)[0].profile(theta)
        assert a.criterion == pytest.approx(b.criterion, rel=1e-9)
        np.testing.assert_allclose(a.beta, b.beta, rtol=1e-9)


def test_engine_matches_lme4_reference(tmp_path):
    ref = load_reference("pub_slopes_reml")
    df = pd.read_csv(ref["csv"], dtype={"g": str})
    src = tmp_path / "events.jsonl"
    write_events(src, df.to_dict("records"))
    run_to_end(src, tmp_path / "s", formula=ref["formula"], snapshot_every_events=1000)
    final = Snapshot.load(tmp_path / "s")
    assert final.n_obs == ref["n"] and dict(final.offsets) == {"jsonl:0": ref["n"]}
    s = MixedLM.from_snapshot(final).fit().snapshot()
    for k, v in ref["fixef"].items():
        assert s.fixef[k] == pytest.approx(v, rel=1e-5)
    assert s.sigma == pytest.approx(ref["sigma"], rel=1e-5)
    assert s.criterion <= ref["criterion"] * (1 + 1e-6)


@pytest.fixture(scope="module")
def stream_200k(tmp_path_factory) -> tuple[Path, list[dict]]:
    events = list(simulate(200_000, 3_000, seed=7))
    path = tmp_path_factory.mktemp("stream") / "events.jsonl"
    write_events(path, events)
    return path, events


def test_sigkill_at_random_moments_neither_loses_nor_double_counts(tmp_path, stream_200k):
    path, events = stream_200k
    snapdir = tmp_path / "snaps"
    args = engine_args(path, snapdir, "--snapshot-every-events", "7000")
    rng = random.Random(3)
    kills = 0
    for frac in sorted(rng.uniform(0.1, 0.9) for _ in range(4)):
        p = run_cli(*args, "--until-end")
        target = frac * len(events)
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            snap = LocalStore(snapdir).latest()
            if snap is not None and snap.n_events >= target:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere between two snapshots
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    p = run_cli(*args, "--until-end")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err.decode()[-2000:]
    assert_same_state(Snapshot.load(snapdir), events)


def test_every_snapshot_records_as_consumed_exactly_what_it_learned(tmp_path, monkeypatch):
    """The engine reads a poll ahead while the last one is decoded; each checkpoint
    first learns what was read, so a snapshot's file identity (lines and bytes
    consumed) and its offsets always describe the events in its statistics."""
    events = list(simulate(3_000, 40, seed=5))
    src = tmp_path / "e.jsonl"
    write_events(src, events)
    seen: list[Snapshot] = []
    checkpoint = Engine.checkpoint

    def spy(self, final=False):
        seen.append(checkpoint(self, final))
        return seen[-1]

    monkeypatch.setattr(Engine, "checkpoint", spy)
    run_to_end(src, tmp_path / "s", max_poll_records=70, snapshot_every_events=250)
    assert len(seen) >= 10
    sizes = np.cumsum([len(json.dumps(e)) + 1 for e in events])
    for snap in seen:
        ident, n = snap.meta["source_identity"], snap.n_events
        assert dict(snap.offsets) == {"jsonl:0": n}
        assert ident["lines"] == n and ident["bytes"] == sizes[n - 1]
    assert_same_state(seen[-1], events)


def test_corrupt_newest_snapshot_falls_back_and_replays(tmp_path, stream_200k):
    path, events = stream_200k
    events, n = events[:30_000], 30_000
    src = tmp_path / "e.jsonl"
    write_events(src, events)
    cfg = run_to_end(src, tmp_path / "s", snapshot_every_events=10_000)
    files = sorted((tmp_path / "s").glob("snapshot-*.slmm"))
    assert len(files) >= 2
    for f in reversed(files):  # torn writes, back to a snapshot before the end
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        prev = LocalStore(tmp_path / "s").latest()
        if prev is None or prev.n_events < n:
            break
    assert prev is not None and prev.n_events < n
    Engine(cfg).run(install_signals=False)  # resumes from the previous one and replays
    assert_same_state(Snapshot.load(tmp_path / "s"), events)


def test_dead_letters_go_to_a_file_and_do_not_change_estimates(tmp_path, stream_200k):
    _, events = stream_200k
    events = events[:5_000]
    bad = [
        b'{"g": "a", "x1": ',
        b'{"g": [1], "x1": 1, "x2": 1, "y": 1}',
        b'{"g": "a", "x1": "1", "x2": 1, "y": 1}',
        b"[]",
        b'{"g": "a", "x1": NaN, "x2": 1}',
    ]
    lines, n_bad = [], 0
    for i, e in enumerate(events):
        lines.append(json.dumps(e).encode())
        if i % 50 == 0:
            lines.append(bad[n_bad % len(bad)])
            n_bad += 1
    src = tmp_path / "e.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    dlq = tmp_path / "dead.jsonl"
    run_to_end(src, tmp_path / "s", dead_letter=str(dlq))
    snap = Snapshot.load(tmp_path / "s")
    letters = [json.loads(x) for x in dlq.read_text().splitlines()]
    assert len(letters) == n_bad == snap.meta["dead_letters"]
    assert all(d["reason"] for d in letters)
    assert snap.offsets["jsonl:0"] == len(lines)
    assert_same_state(snap, events)


def test_sigterm_finishes_snapshots_and_exits_zero(tmp_path, stream_200k):
    path, events = stream_200k
    snapdir = tmp_path / "s"
    p = run_cli(*engine_args(path, snapdir, "--snapshot-every-seconds", "1000"))
    time.sleep(3.0)  # mid-stream or tailing the file's end: either way it must stop cleanly
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()[-2000:]
    snap = Snapshot.load(snapdir)
    done = snap.offsets["jsonl:0"]
    assert 0 < done and snap.n_obs == done
    assert_same_state(snap, events[:done])


def test_config_from_env_and_toml_with_flag_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'formula = "y ~ x + (1 | g)"\nsnapshot_dir = "/tmp/a"\nmethod = "ML"\n'
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n'
    )
    env = {"STREAMLMM_SNAPSHOT_DIR": "/tmp/b", "STREAMLMM_KAFKA__SASL_PLAIN_PASSWORD": "s3cret"}
    cfg = load_config({"source": "jsonl:-", "method": "REML"}, env=env, path=str(toml))
    assert (cfg.formula, cfg.snapshot_dir, cfg.method) == ("y ~ x + (1 | g)", "/tmp/b", "REML")
    assert cfg.kafka == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_password": "s3cret",
    }
    with pytest.raises(ValueError, match="unsupported kafka client settings"):
        load_config(
            {"source": "jsonl:-"},
            env={**env, "STREAMLMM_KAFKA__ENABLE_AUTO_COMMIT": "1"},
            path=str(toml),
        )
    with pytest.raises(ValueError, match="missing required settings"):
        load_config({}, env={})


def test_snapshot_dir_of_another_model_is_refused(tmp_path):
    src = tmp_path / "e.jsonl"
    write_events(src, list(simulate(100, 5)))
    cfg = run_to_end(src, tmp_path / "s")
    other = EngineConfig(**{**cfg.__dict__, "formula": "y ~ x1 + (1 | g)"})
    with pytest.raises(ValueError, match="another --snapshot-dir"):
        Engine(other)


def test_cli_reports_bad_settings_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLMM_")}
    p = run_cli("--source", "jsonl:-", env=env)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and b"missing required settings" in err and b"Traceback" not in err


def test_snapshots_of_one_file_do_not_merge_but_of_two_files_do(tmp_path):
    """Two engines over one file (the second after it grew) hold its first lines twice:
    merging them would count those events twice, so it is refused, naming the file.
    Engines over two different files hold disjoint events and merge."""
    events = list(simulate(400, 20, seed=3))
    src = tmp_path / "events.jsonl"
    write_events(src, events[:180])
    run_to_end(src, tmp_path / "a")
    with src.open("a") as f:  # the same file, grown
        f.write("".join(json.dumps(e) + "\n" for e in events[180:200]))
    run_to_end(src, tmp_path / "b")
    a, b = Snapshot.load(tmp_path / "a"), Snapshot.load(tmp_path / "b")
    assert (a.n_events, b.n_events) == (180, 200)
    with pytest.raises(ValueError, match=f"both hold events of JSON-lines file {src}"):
        MixedLM.from_snapshots([a, b])
    other = tmp_path / "more.jsonl"
    write_events(other, events[200:])
    run_to_end(other, tmp_path / "c")
    merged = MixedLM.from_snapshots([b, Snapshot.load(tmp_path / "c")])
    assert merged.n_events == 400 and merged._stats.n_obs == 400.0


def test_progress_line_counts_the_groups_before_any_refit(tmp_path, capsys):
    src = tmp_path / "e.jsonl"
    evs = list(simulate(500, 20))
    write_events(src, evs)
    cfg = EngineConfig(
        source=f"jsonl:{src}", formula=FORMULA, snapshot_dir=str(tmp_path / "s"), progress_seconds=0
    )
    eng = Engine(cfg)
    try:
        eng.step(eng.source.poll(500, 0))
        assert eng.model.n_refits == 0 and eng.last_snapshot is None  # learned, not refit
        eng._progress(1.0, 500)
    finally:
        eng._close()
    line = capsys.readouterr().err
    assert f"| groups {len({e['g'] for e in evs})} |" in line, line
