from __future__ import annotations

import pytest

from streamlmm.stream.sources import MAX_LINE_BYTES, JsonlSource, open_source


def test_jsonl_offsets_are_line_numbers_and_seek_resumes(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("".join(f'{{"i": {i}}}\n' for i in range(10)))
    src = JsonlSource(str(p))
    first = src.poll(4, 0)
    assert [r.offset for r in first] == [0, 1, 2, 3]
    src2 = JsonlSource(str(p))
    src2.seek({"jsonl:0": 4})
    rest = src2.poll(100, 0)
    assert [r.offset for r in rest] == list(range(4, 10)) and src2.exhausted
    assert rest.record(0).value == b'{"i": 4}'


def test_overlong_line_is_one_record_and_the_next_line_survives(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_bytes(b"x" * (3 * MAX_LINE_BYTES) + b"\n" + b'{"ok": 1}\n')
    recs = JsonlSource(str(p)).poll(10, 0)
    assert len(recs) == 2 and recs.record(1).value == b'{"ok": 1}' and recs.record(1).offset == 1


def test_a_utf8_bom_at_the_start_is_not_part_of_the_first_event(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"i": 0}\n{"i": 1}\n')
    src = JsonlSource(str(p))
    got = src.poll(10, 0)
    assert got.values == [b'{"i": 0}', b'{"i": 1}']
    assert src.identity()["bytes"] == p.stat().st_size  # consumed (and hashed) all the same
    src3 = JsonlSource(str(p))
    src3.poll(1, 0)
    ident = src3.identity()
    src4 = JsonlSource(str(p))
    assert src4.resume({"jsonl:0": 1}, ident, False) == {"jsonl:0": 1}
    assert src4.poll(10, 0).values == [b'{"i": 1}']


@pytest.mark.parametrize("spec", ["kafka://", "kafka://host:1", "mqtt://x", "file.jsonl"])
def test_bad_source_specs_are_clear_errors(spec):
    with pytest.raises(ValueError):
        open_source(spec, "g")


@pytest.mark.parametrize("client", ["kafka-python", "confluent-kafka"])
def test_no_broker_is_said_as_such(client, monkeypatch):
    # without the check: kafka-python's KafkaTimeoutError after ~30 s, confluent-kafka's
    # "topic 'events' not found" after its 60 s metadata wait
    monkeypatch.setenv("STREAMLMM_BROKER_WAIT_SECONDS", "1")
    with pytest.raises(RuntimeError, match=r"^no broker at 127.0.0.1:1: Connection refused"):
        open_source("kafka://127.0.0.1:1/events", "g", client=client)


def test_a_broker_that_comes_up_within_the_wait_is_found():
    import socket
    import threading

    from streamlmm.stream.broker import wait_for_broker

    with socket.socket() as probe:  # a free port, then nothing listens on it for a while
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def come_up():
        server.bind(("127.0.0.1", port))
        server.listen()

    t = threading.Timer(0.5, come_up)
    t.start()
    try:
        wait_for_broker(f"127.0.0.1:1,127.0.0.1:{port}", timeout_s=60)
    finally:
        t.join()
        server.close()
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        wait_for_broker("localhost")
