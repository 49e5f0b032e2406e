"""The part-file naming rule that makes compaction crash-safe: every row is read exactly once at any moment."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from gradnorm.toolkit import schema


def test_names_round_trip():
    assert schema.part_file_range(schema.part_file_name(7)) == (7, 7)
    assert schema.part_file_range(schema.compacted_part_file_name(1, 50)) == (1, 50)
    for bad in [
        "part-.parquet",
        "part-000002-000001.parquet",
        "part-0000a1.parquet",
        "part-1-2-3.parquet",
        "run.json",
        "part-000001.parquet.tmp",
        "part-٣.parquet",
    ]:
        assert schema.part_file_range(bad) is None, bad


@given(st.integers(1, 30), st.lists(st.tuples(st.integers(1, 30), st.integers(0, 10)), max_size=6), st.data())
def test_every_sequence_is_read_once_at_every_moment_of_a_compaction(count, merges, data):
    """Files 1..count written; then merges, each written before its originals go. Any prefix of that
    history (a crash, or a reader looking) must cover each written sequence exactly once."""
    present = {schema.part_file_name(i) for i in range(1, count + 1)}
    history = [set(present)]
    for start, length in merges:
        first, last = min(start, count), min(start + length, count)
        if first == last:
            continue
        live, _ = schema.live_part_files(sorted(present))
        covered = [n for n in live if first <= schema.part_file_range(n)[0] and schema.part_file_range(n)[1] <= last]
        if len(covered) < 2 or schema.part_file_range(covered[0])[0] != first or schema.part_file_range(covered[-1])[1] != last:
            continue  # the recorder merges two or more whole live files
        present.add(schema.compacted_part_file_name(first, last))
        history.append(set(present))
        for name in covered:
            present.discard(name)
            history.append(set(present))
    for moment in history:
        live, overlapping = schema.live_part_files(sorted(moment))
        assert overlapping == []
        sequences = list(itertools.chain.from_iterable(range(a, b + 1) for a, b in map(schema.part_file_range, live)))
        assert sequences == list(range(1, count + 1))


def test_a_partial_overlap_is_left_out_and_named():
    live, overlapping = schema.live_part_files(["part-000001-000004.parquet", "part-000003-000006.parquet", "part-000007.parquet"])
    assert live == ["part-000001-000004.parquet", "part-000007.parquet"] and overlapping == ["part-000003-000006.parquet"]
