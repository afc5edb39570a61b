"""LocalStore: atomic checksummed files, retention and fallback past a corrupt newest file."""

from __future__ import annotations

import numpy as np
import pytest

from streamlmm import LocalStore, MixedLM, Snapshot


def _snapshot(n_events: int) -> Snapshot:
    model = MixedLM("y ~ x + (1 | g)")
    for i in range(n_events):
        model.learn_one({"g": i % 3, "x": float(i % 5)}, float(i % 7) + 0.5 * (i % 3))
    return model.fit().snapshot(offsets={"t:0": n_events})


@pytest.fixture(scope="module")
def snaps():
    return [_snapshot(n) for n in (20, 30, 40, 50)]


def _files(store: LocalStore):
    return [p for _, p in store._files()]


def test_latest_is_the_newest_written(tmp_path, snaps):
    store = LocalStore(tmp_path, keep=10)
    assert store.latest() is None
    for s in snaps:
        store.write(s)
        assert store.latest().n_events == s.n_events
    assert len(_files(store)) == len(snaps)


def test_only_keep_newest_files_are_retained(tmp_path, snaps):
    store = LocalStore(tmp_path, keep=2)
    paths = [store.write(s) for s in snaps]
    assert _files(store) == paths[-2:]
    assert store.latest().n_events == snaps[-1].n_events


def test_no_temporary_files_are_left_behind(tmp_path, snaps):
    store = LocalStore(tmp_path)
    store.write(snaps[0])
    store.write(snaps[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in _files(store)]


def test_truncated_newest_falls_back_to_previous(tmp_path, snaps):
    store = LocalStore(tmp_path, keep=5)
    store.write(snaps[0])
    newest = store.write(snaps[1])
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    got = store.latest()
    assert got.n_events == snaps[0].n_events
    np.testing.assert_array_equal(got.b, snaps[0].b)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.99])
def test_corrupt_newest_falls_back_to_previous(tmp_path, snaps, where):
    store = LocalStore(tmp_path, keep=5)
    for s in snaps[:3]:
        newest = store.write(s)
    data = bytearray(newest.read_bytes())
    data[int(where * len(data))] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert store.latest().n_events == snaps[1].n_events
    assert Snapshot.load(tmp_path).n_events == snaps[1].n_events


def test_empty_newest_file_falls_back(tmp_path, snaps):
    store = LocalStore(tmp_path)
    store.write(snaps[0])
    store.write(snaps[1]).write_bytes(b"")
    assert store.latest().n_events == snaps[0].n_events


def test_all_corrupt_means_none(tmp_path, snaps):
    store = LocalStore(tmp_path)
    for s in snaps[:2]:
        store.write(s).write_bytes(b"garbage")
    assert store.latest() is None
    with pytest.raises(FileNotFoundError):
        Snapshot.load(tmp_path)


def test_unrelated_files_are_ignored(tmp_path, snaps):
    (tmp_path / "README").write_text("not a snapshot")
    (tmp_path / "snapshot-1.slmm").write_bytes(b"bad name")
    store = LocalStore(tmp_path)
    store.write(snaps[0])
    assert store.latest().n_events == snaps[0].n_events
    assert (tmp_path / "README").exists()


def test_sequence_continues_after_reopening(tmp_path, snaps):
    first = LocalStore(tmp_path).write(snaps[0])
    second = LocalStore(tmp_path).write(snaps[1])
    assert second.name > first.name
    assert LocalStore(tmp_path).latest().n_events == snaps[1].n_events


def test_directory_is_created(tmp_path, snaps):
    target = tmp_path / "a" / "b"
    LocalStore(target).write(snaps[0])
    assert Snapshot.load(target).n_events == snaps[0].n_events
