"""A real Celery worker with LABELER_METRICS_PORT labels a real run; its /metrics endpoint, the
per-worker activity in Redis, `labeler status` and `labeler report` must all show that run."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from conftest import GOOD_IMAGES, REPO
from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[str, list]:
    """Metric family name -> samples, from the worker's real HTTP endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    matches = [
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, f"{name} {labels}: {matches}"
    return matches[0]


def test_worker_metrics_endpoint_counts_the_run(labeled_run) -> None:
    families = scrape(labeled_run["port"])
    counts = labeled_run["counts"]
    assert counts["done"] == GOOD_IMAGES + 3 and counts["failed"] == 3
    assert value(families["labeler_worker_up"], "labeler_worker_up") == 1
    host = families["labeler_worker_up"][0].labels["hostname"]
    assert host.startswith("metrics1@"), host  # the Celery node name, as Flower shows it
    assert value(families["labeler_images_labeled"], "labeler_images_labeled_total") == GOOD_IMAGES
    errors = {
        s.labels["code"]: s.value for s in families["labeler_image_errors"] if s.name.endswith("_total")
    }
    assert errors == {"decode_failed": 2, "not_found": 1}
    batches = value(families["labeler_batch_size"], "labeler_batch_size_count")
    images_in_batches = value(families["labeler_batch_size"], "labeler_batch_size_sum")
    assert batches >= 1 and images_in_batches == GOOD_IMAGES
    assert value(families["labeler_inference_seconds"], "labeler_inference_seconds_count") == batches
    assert value(families["labeler_inference_seconds"], "labeler_inference_seconds_sum") > 0
    # Every image, good or bad, went through read + decode on a decode thread.
    assert value(families["labeler_decode_seconds"], "labeler_decode_seconds_count") == GOOD_IMAGES + 3
    assert value(families["labeler_queue_wait_seconds"], "labeler_queue_wait_seconds_count") == GOOD_IMAGES
    # No GPU here: NVML is absent or has no driver, and the scrape still works without GPU samples.
    assert "labeler_gpu_memory_used_bytes" not in families


def test_worker_activity_is_recorded_per_worker(labeled_run, redis_server) -> None:
    from worker.ledger.activity import timeline, worker_activity

    client = redis_server.client()
    workers = worker_activity(client, "labeler", labeled_run["run"])
    assert [w.worker.split("@")[0] for w in workers] == ["metrics1"]
    assert workers[0].images == GOOD_IMAGES + 3 and workers[0].failed == 3
    assert workers[0].last_at >= workers[0].first_at > 0
    assert sum(images for _, images in timeline(client, "labeler", labeled_run["run"])) == GOOD_IMAGES + 3


def labeler(labeled_run: dict, *args: str) -> str:
    """Run `labeler ARGS` against the labeled run's Redis, as an operator would; its stdout."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=labeled_run["env"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def test_status_json_reports_workers(labeled_run) -> None:
    out = labeler(labeled_run, "status", labeled_run["run"], "--json")
    status = json.loads(out)
    assert status["done"] == GOOD_IMAGES + 3
    [worker] = status["workers"]
    assert worker["worker"].startswith("metrics1@") and worker["images"] == GOOD_IMAGES + 3


def test_status_text_shows_per_worker_throughput(labeled_run) -> None:
    out = labeler(labeled_run, "status", labeled_run["run"])
    assert "workers" in out
    line = next(line for line in out.splitlines() if "metrics1@" in line)
    assert f"{GOOD_IMAGES + 3} images" in line and "images/s" in line


def test_report_renders_in_headless_chromium(labeled_run, browser, tmp_path) -> None:
    out = tmp_path / "report.html"
    labeler(labeled_run, "report", labeled_run["run"], "--out", str(out))
    html = out.read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert "<script" not in html
    browser.get(out.as_uri())
    assert browser.title == f"labeler run {labeled_run['run']}"
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg.chart')).map(s => {"
        " const r = s.getBoundingClientRect(); return [s.closest('section').id, r.width, r.height]; })"
    )
    assert {section for section, _, _ in sizes} == {"throughput", "errors", "labels"}
    assert all(width > 300 and height > 50 for _, width, height in sizes), sizes
    bars = browser.execute_script(
        "return Array.from(document.querySelectorAll('#errors rect.bar')).map(r => r.getBBox().width)"
    )
    assert len(bars) == 2 and all(width > 0 for width in bars)  # decode_failed, not_found
    labels = browser.execute_script("return document.querySelectorAll('#labels rect.bar').length")
    assert 1 <= labels <= 10  # the tiny bundle has ten classes
    summary = browser.find_element("id", "summary").text
    assert f"{GOOD_IMAGES + 3}" in summary
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
