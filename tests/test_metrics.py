from __future__ import annotations

import numpy as np

from pipeline.graph import frame_accounting, pipeline_graph
from pipeline.metrics import SEGMENTS, LatencyBook, LatencyHistogram, segment_row


def test_histogram_percentiles_within_one_percent() -> None:
    values = np.random.default_rng(1).lognormal(mean=2.0, sigma=0.8, size=20000)
    hist = LatencyHistogram()
    hist.add(values[:7000])
    hist.add(values[7000:])
    for q in (50, 90, 95, 99):
        exact = np.percentile(values, q, method="inverted_cdf")
        assert abs(hist.percentile(q) - exact) / exact < 0.01
    assert hist.max == values.max() and hist.percentile(100) == values.max()
    assert hist.summary()["count"] == 20000


def test_empty_histogram() -> None:
    assert np.isnan(LatencyHistogram().percentile(50))
    assert LatencyHistogram().summary() == {"count": 0}


def test_book_skips_first_and_last_frames() -> None:
    book = LatencyBook(skip=10)
    rows = np.tile(np.arange(100, dtype=float)[:, None] + 1, (1, len(SEGMENTS)))
    for chunk in np.array_split(rows, 7):
        book.add_rows(chunk)
    summary = book.summary()["end_to_end"]
    assert summary["count"] == 80
    assert summary["max"] == 90  # frames 11..90 kept
    assert book.take_window().count == 100 and book.take_window().count == 0


def test_segment_row() -> None:
    stamps = {name: i * 1_000_000 for i, name in enumerate(
        ("cap", "cap_out", "pre_in", "pre_out", "inf_in", "inf_out", "post_in", "post_out"))}
    row = dict(zip(SEGMENTS, segment_row(stamps), strict=True))
    assert row["end_to_end"] == 7.0 and row["infer"] == 1.0 and row["capture>preprocess"] == 1.0


def test_accounting_balances_only_when_every_frame_is_placed() -> None:
    counters = {"capture": {"read": 100, "sent": 95, "drop_send_full": 5},
                "preprocess": {"drop_stale": 3, "drop_overwritten": 2, "sent": 90},
                "infer": {"drop_stale": 10, "sent": 80},
                "postprocess": {"scored": 80}}
    result = frame_accounting(counters, pipeline_graph())
    assert result["balanced"] and result["dropped"] == 20
    assert result["boundaries"]["capture>preprocess"]["dropped"] == 10
    counters["postprocess"]["scored"] = 79
    assert not frame_accounting(counters, pipeline_graph())["balanced"]


def test_a_run_too_short_to_skip_reports_every_frame() -> None:
    book = LatencyBook(skip=10)
    book.add_rows(np.ones((15, len(SEGMENTS))))
    assert book.summary()["end_to_end"]["count"] == 15  # nothing would be left after 2 x 10 skipped
    book.add_rows(np.ones((10, len(SEGMENTS))))
    assert book.summary()["end_to_end"]["count"] == 5  # long enough: warm-up and cool-down skipped
