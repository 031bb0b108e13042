"""The run ledger, the shard list and the enqueue client against a real private redis-server and
real files (no worker): every transition of a shard, and what an enqueue stores and publishes."""

from __future__ import annotations

import base64
import csv
import json
import threading
import time
from pathlib import Path

import pytest
import redis

from worker.client.enqueue import EnqueueError, enqueue_run
from worker.client.export import ExportError, export_records
from worker.client.status import RateMeter, follow, format_status
from worker.dataset.shard_list import ShardListError, read_index, shard_source, stored_root_shards
from worker.ledger.keys import RunNameError, check_run_name
from worker.ledger.ledger import RunLedger, RunStatus
from worker.ledger.protocol import SHARD_TASK, shard_message
from worker.pipeline.inputs import InputError, iter_input_paths, unique_by_digest
from worker.settings import Settings, SettingsError

OWNER_A, OWNER_B = "a@host#1", "b@host#2"


@pytest.fixture
def ledger(redis_url: str) -> RunLedger:
    return RunLedger(redis.Redis.from_url(redis_url))


def new_run(ledger: RunLedger, tmp_path: Path, run: str = "r", shards: int = 2, images: int = 10) -> None:
    ledger.create_run(run, str(tmp_path / run), images, {}, "q")
    ledger.register_shards(run, [(f"{i:06d}", images) for i in range(shards)])


def test_settings_read_from_env_and_checked() -> None:
    env = {"LABELER_BROKER_URL": "rediss://:pw@host:6380/1?ssl_cert_reqs=required", "LABELER_SHARD_SIZE": "64",
           "LABELER_ALLOWED_ROOTS": "/data/a:/data/b", "LABELER_OUTPUT_ROOTS": "/out"}  # fmt: skip
    settings = Settings.from_env(env)
    assert settings.broker_url.startswith("rediss://")
    assert (settings.shard_size, settings.output_roots) == (64, ("/out",))
    assert settings.allowed_roots == ("/data/a", "/data/b")
    assert Settings.from_env(settings.env()) == settings
    with pytest.raises(SettingsError, match="VISIBILITY_TIMEOUT"):
        Settings.from_env({"LABELER_VISIBILITY_TIMEOUT_S": "100", "LABELER_TASK_DEADLINE_S": "200"})
    with pytest.raises(SettingsError, match="LEASE_S"):
        Settings.from_env({"LABELER_LEASE_S": "10", "LABELER_HEARTBEAT_S": "6"})
    with pytest.raises(SettingsError, match="not a valid int"):
        Settings.from_env({"LABELER_SHARD_SIZE": "many"})


def test_run_names_are_checked() -> None:
    assert check_run_name("photos-2026.11:a") == "photos-2026.11:a"
    for bad in ("", "a b", "x" * 300, "-leading", "a*", "a|b"):
        with pytest.raises(RunNameError):
            check_run_name(bad)


def test_a_shard_is_held_by_one_living_worker_and_finished_once(ledger: RunLedger, tmp_path) -> None:
    new_run(ledger, tmp_path)
    assert ledger.claim("r", "000000", OWNER_A, 30, 3, 10).verdict == "run"
    assert ledger.claim("r", "000000", OWNER_B, 30, 3, 10).verdict == "busy"  # a duplicate message
    assert ledger.renew("r", OWNER_A, ["000000"], 30) == []
    assert ledger.renew("r", OWNER_B, ["000000"], 30) == ["000000"]  # B holds nothing
    assert not ledger.finish("r", "000000", OWNER_B, 10, 0)  # only the holder finishes
    assert ledger.finish("r", "000000", OWNER_A, 9, 1)
    assert not ledger.finish("r", "000000", OWNER_A, 9, 1)  # and only once
    assert ledger.claim("r", "000000", OWNER_B, 30, 3, 10).verdict == "done"
    status = ledger.status("r", "q")
    assert (status.total, status.done, status.failed, status.shards, status.shards_done) == (20, 10, 1, 2, 1)
    assert not status.finished() and status.pending == 10


def test_a_lapsed_lease_goes_back_to_the_front_of_the_queue_once(ledger: RunLedger, tmp_path) -> None:
    new_run(ledger, tmp_path)
    client = ledger.client
    client.lpush("q", "older-message")
    assert ledger.claim("r", "000001", OWNER_A, 0.2, 3, 10).verdict == "run"
    assert ledger.lapsed() == []
    time.sleep(0.3)
    assert ledger.lapsed() == [("r", "000001")]
    message = shard_message("r", "000001", "/out", "q", origin="test")
    assert ledger.requeue_lapsed("r", "q", [("000001", message)]) == ["000001"]
    assert ledger.requeue_lapsed("r", "q", [("000001", message)]) == []  # a second sweeper wins nothing
    assert client.rpop("q").decode() == message  # the next message a worker takes
    assert ledger.lapsed() == []
    assert ledger.renew("r", OWNER_A, ["000001"], 30) == ["000001"]  # the lost worker learns it
    assert not ledger.finish("r", "000001", OWNER_A, 10, 0)  # and cannot finish it any more
    claim = ledger.claim("r", "000001", OWNER_B, 30, 3, 10)
    assert (claim.verdict, claim.attempts) == ("run", 2)


def test_release_uncounts_a_workers_fault_and_attempts_run_out(ledger: RunLedger, tmp_path) -> None:
    new_run(ledger, tmp_path)
    for _ in range(3):
        assert ledger.claim("r", "000000", OWNER_A, 30, 2, 10).verdict == "run"
        assert ledger.release("r", "000000", OWNER_A, uncount=True)  # warm shutdown: not the shard's fault
    assert ledger.shard_state("r", "000000").attempts == 0
    for _ in range(2):
        assert ledger.claim("r", "000000", OWNER_A, 30, 2, 10).verdict == "run"
        assert ledger.release("r", "000000", OWNER_A, uncount=False)
    claim = ledger.claim("r", "000000", OWNER_A, 30, 2, 10)
    assert (claim.verdict, claim.attempts) == ("exhausted", 2)
    assert ledger.claim("r", "000000", OWNER_A, 30, 2, 10, force=True).verdict == "run"


def test_split_replaces_a_shard_by_its_halves_at_the_front(ledger: RunLedger, tmp_path) -> None:
    new_run(ledger, tmp_path, shards=1)
    halves = [("000000.0", 5, "m0"), ("000000.1", 5, "m1")]
    assert ledger.split("r", "q", "000000", halves)
    assert not ledger.split("r", "q", "000000", halves)  # once
    assert ledger.client.lrange("q", 0, -1) == [b"m0", b"m1"]
    states = {s.shard_id: s.state for s in ledger.shard_states("r")}
    assert states == {"000000": "split", "000000.0": "queued", "000000.1": "queued"}
    status = ledger.status("r", "q")
    assert (status.total, status.shards) == (10, 2)  # the same images, one more shard
    for half in ("000000.0", "000000.1"):
        ledger.claim("r", half, OWNER_A, 30, 1, 5)
        ledger.finish("r", half, OWNER_A, 5, 0)
    assert ledger.status("r", "q").finished()


def test_a_shard_a_living_worker_holds_is_not_split_under_it(ledger: RunLedger, tmp_path) -> None:
    """A worker allowed more attempts took the shard after another's claim said exhausted: the
    split waits for its lease to lapse (its worker lost), and the holder can still finish it."""
    new_run(ledger, tmp_path, shards=1)
    clock = [1000.0]
    ledger.clock = lambda: clock[0]
    assert ledger.claim("r", "000000", OWNER_A, 30, 5, 10).verdict == "run"
    halves = [("000000.0", 5, "m0"), ("000000.1", 5, "m1")]
    assert not ledger.split("r", "q", "000000", halves)
    assert ledger.shard_state("r", "000000").state == "running" and ledger.client.llen("q") == 0
    clock[0] += 31  # the holder is lost: its lease lapsed
    assert ledger.split("r", "q", "000000", halves)
    assert not ledger.finish("r", "000000", OWNER_A, 10, 0)
    assert ledger.status("r", "q").shards == 2


def test_reopen_takes_failed_shards_out_of_the_counts_until_they_finish_again(ledger: RunLedger, tmp_path) -> None:
    new_run(ledger, tmp_path)
    for shard, failed in (("000000", 2), ("000001", 0)):
        ledger.claim("r", shard, OWNER_A, 30, 3, 10)
        ledger.finish("r", shard, OWNER_A, 10 - failed, failed)
    assert ledger.reopen("r", ["000000", "000001"], ["not_found"]) == ["000000"]  # only one with errors
    assert ledger.shard_state("r", "000000").retry_codes == ("not_found",)
    status = ledger.status("r", "q")
    assert (status.done, status.failed, status.shards_done) == (10, 0, 1)
    ledger.claim("r", "000000", OWNER_B, 30, 3, 10)
    ledger.finish("r", "000000", OWNER_B, 9, 1)
    status = ledger.status("r", "q")
    assert (status.done, status.failed, status.shards_done) == (20, 1, 2)
    assert ledger.shard_state("r", "000000").retry_codes is None


def test_shard_message_is_celery_protocol_v2() -> None:
    envelope = json.loads(shard_message("r1", "000042", "/out/r1", "labeler"))
    assert envelope["headers"]["task"] == SHARD_TASK == "labeler.label_shard.v2"
    assert envelope["headers"]["id"] == envelope["properties"]["correlation_id"]
    assert envelope["content-type"] == "application/json"
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    assert args == [] and kwargs == {"run": "r1", "shard": "000042", "output": "/out/r1"}
    assert embed["chain"] is None and envelope["properties"]["delivery_info"]["routing_key"] == "labeler"


def test_enqueue_stores_the_shard_list_and_publishes_each_shard(redis_url: str, tmp_path) -> None:
    client = redis.Redis.from_url(redis_url)
    out = tmp_path / "out"
    summary = enqueue_run(client, "e", (f"/img/{i}.jpg" for i in range(25)), str(out), "q", shard_size=10)
    assert (summary.seen, summary.shards, summary.jobs, summary.queued) == (25, 3, 3, 25)
    assert client.llen("q") == 3
    assert shard_source(out, "000002") == [f"/img/{i}.jpg" for i in range(20, 25)]
    assert shard_source(out, "000001.1") == [f"/img/{i}.jpg" for i in range(15, 20)]  # a half, not stored
    assert read_index(out)["images"] == 25
    # Again: the stored list is the run, whatever the inputs say now; nothing done is published.
    client.delete("q")
    ledger = RunLedger(client)
    ledger.claim("e", "000000", OWNER_A, 30, 3, 10)
    ledger.finish("e", "000000", OWNER_A, 10, 0)
    ledger.claim("e", "000001", OWNER_A, 30, 3, 10)  # running on a living worker
    again = enqueue_run(client, "e", (f"/other/{i}.jpg" for i in range(99)), str(out), "q", shard_size=7)
    assert (again.seen, again.shards, again.jobs, again.skipped, again.reused_list) == (25, 3, 1, 20, True)
    assert json.loads(base64.b64decode(json.loads(client.lpop("q"))["body"]))[1]["shard"] == "000002"
    assert ledger.status("e", "q").total == 25  # registered once
    with pytest.raises(EnqueueError, match="writes into"):
        enqueue_run(client, "e", [], str(tmp_path / "elsewhere"), "q")


def test_an_interrupted_enqueue_resumes_only_on_the_same_inputs(redis_url: str, tmp_path) -> None:
    client = redis.Redis.from_url(redis_url)
    out = tmp_path / "out"

    def listing_then_kill(paths):
        for i, path in enumerate(paths):
            if i == 23:
                raise KeyboardInterrupt  # the enqueue is killed mid-listing
            yield path

    paths = [f"/img/{i:03d}.jpg" for i in range(40)]
    with pytest.raises(KeyboardInterrupt):
        enqueue_run(client, "k", listing_then_kill(paths), str(out), "q", shard_size=10)
    assert read_index(out) is None and stored_root_shards(out) == ["000000", "000001"]  # two whole shards
    assert not RunLedger(client).status("k", "q").enqueuing()  # the lease went with it
    with pytest.raises(ShardListError, match="no longer list the same paths"):
        enqueue_run(client, "k", ["/img/new.jpg", *paths], str(out), "q", shard_size=10)
    resumed = enqueue_run(client, "k", paths, str(out), "q", shard_size=10)
    assert (resumed.seen, resumed.shards, resumed.jobs) == (40, 4, 4)  # the first two were never done
    assert [p for i in range(4) for p in shard_source(out, f"{i:06d}")] == paths  # none twice, none skipped
    assert RunLedger(client).status("k", "q").total == 40


def test_enqueue_waits_while_the_queue_is_full(redis_url: str, tmp_path) -> None:
    client = redis.Redis.from_url(redis_url)
    client.rpush("q", *[b"x"] * 5)

    def drain_later() -> None:
        time.sleep(0.6)
        client.delete("q")

    thread = threading.Thread(target=drain_later)
    thread.start()
    summary = enqueue_run(client, "bp", [f"/p{i}" for i in range(20)], str(tmp_path / "o"), "q", shard_size=10,
                          max_queued_jobs=3, poll_s=0.1)  # fmt: skip
    thread.join()
    assert summary.waited_s >= 0.3 and summary.jobs == 2


def test_manifests_lists_and_duplicates(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["/m/a.jpg", "/m/b.jpg"], "label": [1, 2]}), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("id,path\n1,/m/c.jpg\n2,/m/a.jpg\n")
    (tmp_path / "list.txt").write_text("/m/d.jpg\n/m/b.jpg\n")
    inputs = [str(tmp_path / "m.parquet"), str(tmp_path / "m.csv"), f"@{tmp_path / 'list.txt'}"]
    assert list(unique_by_digest(iter_input_paths(inputs))) == ["/m/a.jpg", "/m/b.jpg", "/m/c.jpg", "/m/d.jpg"]
    (tmp_path / "bad.csv").write_text("file\n/m/x.jpg\n")
    with pytest.raises(InputError, match="'path' column"):
        list(iter_input_paths([str(tmp_path / "bad.csv")]))


def test_export_streams_records_as_jsonl_and_csv(tmp_path) -> None:
    """Parquet is exported from the dataset's rows, in its schema: tests/dataset/test_export.py."""
    records = [{"path": f"/ok{i}", "labels": [{"index": i % 5, "label": f"c{i % 5}", "score": 0.9}]} for i in range(2500)]
    records.append({"path": "/bad", "error": {"code": "decode_failed", "message": "bad"}})
    jsonl = tmp_path / "out.jsonl"
    assert export_records(iter(records), jsonl) == 2501
    assert len({json.loads(line)["path"] for line in jsonl.read_text().splitlines()}) == 2501
    out_csv = tmp_path / "out.csv"
    export_records(iter(records), out_csv)
    rows = {row["path"]: row for row in csv.DictReader(out_csv.open())}
    assert rows["/bad"]["error_code"] == "decode_failed" and rows["/ok3"]["top1_index"] == "3"
    with pytest.raises(ExportError):
        export_records(iter(()), tmp_path / "out.xlsx")


def test_status_text_and_rate() -> None:
    meter = RateMeter(smoothing=1.0)
    assert meter.sample(0, now=0.0) is None
    assert meter.sample(100, now=2.0) == pytest.approx(50.0)
    status = RunStatus("r", 1000, 400, 10, 10, 4, 3, 0.0, 0.0, 8.0)
    text = format_status(status, rate=50.0)
    assert "pending 600" in text and "ETA 0m12s" in text and "failed 10" in text and "shards 4/10" in text


def test_app_is_json_only_with_late_acks_and_one_visibility_timeout() -> None:
    from worker.celery_worker.app import create_app

    conf = create_app(Settings(broker_url="redis://:pw@127.0.0.1:1/0", visibility_timeout_s=999)).conf
    assert conf.accept_content == conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    broker, backend = conf.broker_transport_options, conf.result_backend_transport_options
    assert broker["visibility_timeout"] == backend["visibility_timeout"] == 999
    assert conf.worker_pool == "threads"


def test_a_run_is_not_finished_while_its_enqueue_is_still_adding_shards(ledger: RunLedger, tmp_path) -> None:
    """Workers can catch up between two batches of a long enqueue: pending is 0 then, but the run
    is not finished while the enqueue's lease is live (status --watch, enqueue --wait)."""
    seen_during_enqueue = []

    def paths_read_slowly():
        for i in range(4):
            seen_during_enqueue.append(ledger.status("lease", "q").enqueuing())
            yield f"/lease/{i}"

    enqueue_run(ledger.client, "lease", paths_read_slowly(), str(tmp_path / "o"), "q", shard_size=2)
    assert seen_during_enqueue[1:] == [True] * 3
    assert not ledger.status("lease", "q").enqueuing()  # released at the end

    ledger.renew_enqueue_lease("lease", 60)  # a second enqueue of the run, still running
    for shard in ("000000", "000001"):
        ledger.claim("lease", shard, OWNER_A, 30, 3, 2)
        ledger.finish("lease", shard, OWNER_A, 2, 0)
    status = ledger.status("lease", "q")
    assert status.pending == 0 and not status.finished()
    assert "enqueue in progress" in format_status(status)
    shown = []
    final = follow(ledger, "lease", "q", 0.0, lambda s, _r: shown.append(s),
                   sleep=lambda _s: ledger.end_enqueue_lease("lease"))  # fmt: skip
    assert final.finished() and len(shown) == 2
    assert "ETA finished" in format_status(final)


def test_a_failed_enqueue_releases_its_lease(ledger: RunLedger, tmp_path) -> None:
    def paths_then_failure():
        yield "/x/1"
        raise OSError("the list file went away")

    with pytest.raises(OSError):
        enqueue_run(ledger.client, "broken-list", paths_then_failure(), str(tmp_path / "o"), "q")
    assert not ledger.status("broken-list", "q").enqueuing()
