"""The report page on its own: bucketing of the timeline, escaping, and rendering in Chromium."""

from __future__ import annotations

from collections import Counter

from worker.client.report.data import ReportData, rebucket
from worker.client.report.page import render_report
from worker.ledger.activity import WorkerActivity
from worker.ledger.ledger import RunStatus


def test_rebucket_fills_gaps_and_converts_to_rates() -> None:
    points, width = rebucket([(100, 50), (130, 20)], 10)
    assert width == 10
    assert points == [(100.0, 5.0), (110.0, 0.0), (120.0, 0.0), (130.0, 2.0)]


def test_rebucket_widens_buckets_for_long_runs() -> None:
    buckets = [(t, 10) for t in range(0, 100_000, 10)]
    points, width = rebucket(buckets, 10, max_points=240)
    assert len(points) <= 240 and width > 10
    assert sum(rate * width for _, rate in points) == 10 * len(buckets)  # no image lost or doubled


def test_rebucket_of_nothing() -> None:
    assert rebucket([], 10) == ([], 10)


def _data(labels: Counter[str], errors: Counter[str]) -> ReportData:
    status = RunStatus("r<1>", 120, 100, 7, 3, 2, 2, 1_700_000_000.0, 1_700_000_010.0, 1_700_000_090.0)
    workers = [WorkerActivity("labeler-gpu0@n1", 100, 7, 1_700_000_010.0, 1_700_000_090.0)]
    throughput, width = rebucket([(1_700_000_010, 30), (1_700_000_040, 70)], 10)
    return ReportData(status, workers, throughput, width, errors, labels)


def test_report_escapes_labels_and_caps_the_label_chart(browser, tmp_path) -> None:
    labels = Counter({f"class {i}": 100 - i for i in range(30)})
    labels["<script>alert(1)</script>"] = 3
    page = render_report(_data(labels, Counter({"decode_failed": 5, "not_found": 2})))
    assert "<script>alert" not in page
    out = tmp_path / "report.html"
    out.write_text(page)
    browser.get(out.as_uri())
    bars = browser.execute_script("return document.querySelectorAll('#labels rect.bar').length")
    assert bars == 21  # top 20 and one "other labels" bar
    texts = browser.execute_script("return document.querySelector('#labels svg').textContent")
    assert "11 other labels" in texts
    points = browser.execute_script(
        "return document.querySelector('#throughput polyline.series').points.length"
    )
    assert points == 4
    assert browser.execute_script("return typeof alert === 'function' && document.scripts.length") == 0


def test_report_of_a_run_without_records_says_so() -> None:
    data = _data(Counter(), Counter())
    data.throughput = []
    page = render_report(data)
    assert "no data yet" in page and "Images with an error record: none" in page
