"""The run store, enqueue client, status and export against a real private redis-server (no worker)."""

from __future__ import annotations

import base64
import csv
import json
import threading
import time

import pytest
import redis

from worker.client.enqueue import enqueue_paths
from worker.client.export import ExportError, export_records
from worker.client.status import RateMeter, format_status
from worker.runs.keys import RunNameError, check_run_name
from worker.runs.protocol import TASK_NAME, job_message
from worker.runs.settings import Settings, SettingsError
from worker.runs.store import RunStore


def labels_record(path: str, index: int = 1) -> dict:
    return {"path": path, "labels": [{"index": index, "label": f"class_{index}", "score": 0.9}]}


def error_rec(path: str) -> dict:
    return {"path": path, "error": {"code": "decode_failed", "message": "bad"}}


def test_settings_read_from_env_and_checked() -> None:
    env = {"LABELER_BROKER_URL": "rediss://:pw@host:6380/1?ssl_cert_reqs=required", "LABELER_CHUNK_SIZE": "64",
           "LABELER_ALLOWED_ROOTS": "/data/a:/data/b"}  # fmt: skip
    settings = Settings.from_env(env)
    assert settings.broker_url.startswith("rediss://")
    assert settings.chunk_size == 64
    assert settings.allowed_roots == ("/data/a", "/data/b")
    assert Settings.from_env(settings.env()) == settings
    with pytest.raises(SettingsError, match="VISIBILITY_TIMEOUT"):
        Settings.from_env({"LABELER_VISIBILITY_TIMEOUT_S": "100", "LABELER_TASK_DEADLINE_S": "200"})
    with pytest.raises(SettingsError, match="not a valid int"):
        Settings.from_env({"LABELER_CHUNK_SIZE": "many"})


def test_run_names_are_checked() -> None:
    assert check_run_name("photos-2026.11:a") == "photos-2026.11:a"
    for bad in ("", "a b", "x" * 300, "-leading", "a*"):
        with pytest.raises(RunNameError):
            check_run_name(bad)


def test_records_are_idempotent_and_counters_exact(redis_url: str) -> None:
    store = RunStore(redis.Redis.from_url(redis_url))
    assert store.write_records("r1", [labels_record("/a"), error_rec("/b")]) == 2
    # A redelivered job rewrites the same records: no new record, counters unchanged.
    assert store.write_records("r1", [labels_record("/a"), error_rec("/b")]) == 0
    status = store.status("r1", "q")
    assert (status.total, status.done, status.failed, status.pending) == (2, 2, 1, 0)
    # A retry that now succeeds replaces the error: still one record, one fewer failure.
    store.write_records("r1", [labels_record("/b", 3)])
    status = store.status("r1", "q")
    assert (status.total, status.done, status.failed) == (2, 2, 0)
    assert store.get_records("r1", ["/b"])[0]["labels"][0]["index"] == 3
    assert store.paths_without_record("r1", ["/a", "/c"]) == ["/c"]


def test_delivery_counting_and_dead_letters(redis_url: str) -> None:
    store = RunStore(redis.Redis.from_url(redis_url))
    assert [store.count_delivery("r", "job1") for _ in range(3)] == [1, 2, 3]
    store.uncount_delivery("r", "job1")
    assert store.count_delivery("r", "job1") == 3
    store.note_error("r", "job1", "boom")
    assert store.last_error("r", "job1") == "boom"
    store.dead_letter("r", "job1", ["/x"], 3, "delivered 3 times")
    [entry] = store.dead_letters("r")
    assert entry["job_id"] == "job1" and entry["paths"] == ["/x"] and entry["deliveries"] == 3
    assert store.last_error("r", "job1") is None


def test_job_message_is_celery_protocol_v2() -> None:
    task_id, raw = job_message("run1", ["/a.jpg", "/b.jpg"], "labeler")
    envelope = json.loads(raw)
    assert envelope["headers"]["task"] == TASK_NAME and envelope["headers"]["id"] == task_id
    assert envelope["content-type"] == "application/json"
    assert envelope["properties"]["delivery_info"] == {"exchange": "", "routing_key": "labeler"}
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    assert args == [] and kwargs == {"run": "run1", "paths": ["/a.jpg", "/b.jpg"]}
    assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}


def test_enqueue_chunks_and_resumes(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    paths = [f"/img/{i:04d}.jpg" for i in range(1050)]
    first = enqueue_paths(client, "resume", paths, "q", chunk_size=100, claim_batch=300)
    assert (first.seen, first.queued, first.jobs, first.skipped) == (1050, 1050, 11, 0)
    assert client.llen("q") == 11
    published = []
    for raw in client.lrange("q", 0, -1):
        published += json.loads(base64.b64decode(json.loads(raw)["body"]))[1]["paths"]
    assert sorted(published) == paths
    # Half of them get records; the rest of the queue is lost; enqueueing again resumes.
    RunStore(client).write_records("resume", [labels_record(p) for p in paths[:500]])
    client.delete("q")
    second = enqueue_paths(client, "resume", paths, "q", chunk_size=100)
    assert (second.skipped, second.queued, second.jobs) == (500, 550, 6)
    status = RunStore(client).status("resume", "q")
    assert (status.total, status.done, status.pending) == (1050, 500, 550)


def test_enqueue_waits_while_the_queue_is_full(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.rpush("q", *[b"x"] * 5)

    def drain_later() -> None:
        time.sleep(0.6)
        client.delete("q")

    thread = threading.Thread(target=drain_later)
    thread.start()
    summary = enqueue_paths(client, "bp", [f"/p{i}" for i in range(20)], "q", chunk_size=10,
                            max_queued_jobs=3, claim_batch=10, poll_s=0.1)  # fmt: skip
    thread.join()
    assert summary.waited_s >= 0.3
    assert summary.jobs == 2


def test_export_streams_every_format(redis_url: str, tmp_path) -> None:
    pa = pytest.importorskip("pyarrow.parquet")
    store = RunStore(redis.Redis.from_url(redis_url))
    store.write_records("ex", [labels_record(f"/ok{i}", i % 5) for i in range(2500)] + [error_rec("/bad")])
    enqueue_paths(store.client, "ex", ["/queued-only"], "q")  # a placeholder is not a record
    jsonl = tmp_path / "out.jsonl"
    assert export_records(store.iter_records("ex", batch=100), jsonl) == 2501
    assert len({json.loads(line)["path"] for line in jsonl.read_text().splitlines()}) == 2501
    out_csv = tmp_path / "out.csv"
    export_records(store.iter_records("ex"), out_csv)
    rows = {row["path"]: row for row in csv.DictReader(out_csv.open())}
    assert rows["/bad"]["error_code"] == "decode_failed" and rows["/ok3"]["top1_index"] == "3"
    parquet = tmp_path / "out.parquet"
    export_records(store.iter_records("ex"), parquet, rows_per_group=1000)
    table = pa.read_table(parquet)
    assert table.num_rows == 2501 and pa.ParquetFile(parquet).num_row_groups == 3
    with pytest.raises(ExportError):
        export_records(iter(()), tmp_path / "out.xlsx")


def test_status_text_and_rate() -> None:
    meter = RateMeter(smoothing=1.0)
    assert meter.sample(0, now=0.0) is None
    assert meter.sample(100, now=2.0) == pytest.approx(50.0)
    from worker.runs.store import RunStatus

    status = RunStatus("r", 1000, 400, 10, 0, 3, 0.0, 0.0, 8.0)
    text = format_status(status, rate=50.0)
    assert "pending 600" in text and "ETA 0m12s" in text and "failed 10" in text


def test_app_is_json_only_with_late_acks_and_one_visibility_timeout() -> None:
    from worker.celery_worker.app import create_app

    conf = create_app(Settings(broker_url="redis://:pw@127.0.0.1:1/0", visibility_timeout_s=999)).conf
    assert conf.accept_content == conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    broker, backend = conf.broker_transport_options, conf.result_backend_transport_options
    assert broker["visibility_timeout"] == backend["visibility_timeout"] == 999
    assert conf.worker_pool == "threads"


def test_a_run_is_not_finished_while_its_enqueue_is_still_adding_paths(redis_url: str) -> None:
    """Workers can catch up between two claim batches of a long enqueue: pending is 0 then, but
    the run is not finished while the enqueue's lease is live (status --watch, enqueue --wait)."""
    from worker.client.status import follow

    store = RunStore(redis.Redis.from_url(redis_url))
    seen_during_enqueue = []

    def paths_read_slowly():
        for i in range(4):
            seen_during_enqueue.append(store.status("lease", "q").enqueuing())
            yield f"/lease/{i}"

    enqueue_paths(store.client, "lease", paths_read_slowly(), "q", chunk_size=2, claim_batch=2)
    assert seen_during_enqueue == [True] * 4
    assert not store.status("lease", "q").enqueuing()  # released at the end

    store.renew_enqueue_lease("lease", 60)  # a second enqueue of the run, still running
    store.write_records("lease", [labels_record(f"/lease/{i}") for i in range(4)])
    status = store.status("lease", "q")
    assert status.pending == 0 and not status.finished()
    assert "enqueue in progress" in format_status(status)
    shown = []
    final = follow(store, "lease", "q", 0.0, lambda s, _r: shown.append(s),
                   sleep=lambda _s: store.end_enqueue_lease("lease"))  # fmt: skip
    assert final.finished() and len(shown) == 2
    assert "ETA finished" in format_status(final)

    store.renew_enqueue_lease("lease", 60, now=time.time() - 120)  # an enqueue killed long ago
    assert store.status("lease", "q").finished()


def test_a_failed_enqueue_releases_its_lease(redis_url: str) -> None:
    store = RunStore(redis.Redis.from_url(redis_url))

    def paths_then_failure():
        yield "/x/1"
        raise OSError("the list file went away")

    with pytest.raises(OSError):
        enqueue_paths(store.client, "broken-list", paths_then_failure(), "q", claim_batch=1)
    assert not store.status("broken-list", "q").enqueuing()


def test_retry_reopens_only_the_chosen_errors_and_keeps_the_counts_exact(redis_url: str) -> None:
    from worker.client.retry import retry_failed

    store = RunStore(redis.Redis.from_url(redis_url))
    gone = {"path": "/gone", "error": {"code": "not_found", "message": "no such file"}}
    store.write_records("retry", [labels_record("/ok"), gone, error_rec("/bad")])
    assert (store.status("retry", "rq").done, store.status("retry", "rq").failed) == (3, 2)

    summary = retry_failed(store.client, "retry", "rq", codes=["not_found"])
    assert (summary.queued, summary.jobs) == (1, 1)
    [job] = [json.loads(m) for m in store.client.lrange("rq", 0, -1)]
    assert json.loads(base64.b64decode(job["body"]))[1]["paths"] == ["/gone"]
    status = store.status("retry", "rq")
    assert (status.total, status.done, status.failed, status.pending) == (3, 2, 1, 1)
    assert store.get_records("retry", ["/gone", "/bad"])[1]["error"]["code"] == "decode_failed"

    # The retried image is labeled: one record, counted once, the run finished.
    store.write_records("retry", [labels_record("/gone")])
    status = store.status("retry", "rq")
    assert (status.total, status.done, status.failed, status.finished()) == (3, 3, 1, True)

    # A record rewritten between the scan and the reopen is left alone.
    [(path, stale)] = [
        (p, v) for p, v in store.client.hscan_iter("labeler:run:retry:records") if p == b"/bad"
    ]
    store.write_records("retry", [labels_record("/bad")])
    assert store._reopen_records("retry", [("/bad", stale)]) == []
    assert store.status("retry", "rq").failed == 0
