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
