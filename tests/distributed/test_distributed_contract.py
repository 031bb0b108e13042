"""The queue contract and its security, against one real worker on a password-protected Redis:
foreign producers (plain redis-py writing the protocol v2 messages of docs/queue-contract.md) that
get labels back in the job's result or submit a shard into a run's dataset, a Celery caller, the
retired protocol answered with a clear failure, pickle rejected unexecuted, malformed jobs, auth,
and a shard whose image kills its worker bisected down to that one image.
"""

from __future__ import annotations

import base64
import json
import pickle
import sys
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from click.testing import CliRunner
from distributed_helpers import (
    PASSWORD,
    QUEUE,
    CeleryWorker,
    assert_exactly_once,
    run_counts,
    run_output,
    wait_for,
    wait_run_done,
    worker_env,
)

from worker.cli import main
from worker.dataset.manifest import read_manifest
from worker.ledger.ledger import RunLedger

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def contract_worker(redis_server, tiny_bundle, tmp_path_factory) -> Iterator[CeleryWorker]:
    """One worker for the module, started the Celery way (`celery -A worker.app worker`)."""
    redis_server.client().flushall()
    env = worker_env(redis_server.url, tiny_bundle)
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-P", "threads", "-c", "4",
            "-Q", QUEUE, "-n", "contract@%h", "-l", "INFO"]  # fmt: skip
    worker = CeleryWorker("contract", env, tmp_path_factory.mktemp("logs"), argv).start()
    yield worker
    worker.stop()


def foreign_message(task: str, kwargs: dict, task_id: str | None = None) -> tuple[str, str]:
    """A protocol v2 message exactly as docs/queue-contract.md spells it (no labeler or Celery code)."""
    task_id = task_id or str(uuid.uuid4())
    body = [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return task_id, json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
                        "group": None, "retries": 0, "eta": None, "expires": None},
            "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                           "delivery_info": {"exchange": "", "routing_key": QUEUE}, "priority": 0,
                           "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
        }  # fmt: skip
    )


def result_of(client: redis.Redis, task_id: str) -> dict:
    raw = wait_for(lambda: client.get(f"celery-task-meta-{task_id}"), 60, "the job's result")
    return json.loads(raw)


def test_foreign_producer_gets_labels_back_in_the_result(contract_worker, redis_server, small_jpegs) -> None:
    client = redis.Redis.from_url(redis_server.url)
    paths = [*small_jpegs[:3], "/no/such/image.jpg"]
    task_id, message = foreign_message("labeler.label_paths.v2", {"paths": paths})
    client.lpush(QUEUE, message)
    meta = result_of(client, task_id)
    assert meta["status"] == "SUCCESS", meta
    records = meta["result"]["records"]
    assert [r["path"] for r in records] == paths  # in the order asked, one each
    assert all(len(r["labels"]) == 5 for r in records[:3]) and records[3]["error"]["code"] == "not_found"
    assert (meta["result"]["labeled"], meta["result"]["failed"]) == (3, 1)
    assert not list(client.scan_iter("labeler:run:*"))  # no run, nothing kept in Redis but the result


def test_foreign_producer_submits_a_shard_into_a_runs_dataset(contract_worker, redis_server, small_jpegs) -> None:
    client = redis.Redis.from_url(redis_server.url)
    paths = small_jpegs[3:9]
    output = str(run_output("foreign"))
    task_id, message = foreign_message("labeler.label_shard.v2",
                                       {"run": "foreign", "shard": "000007", "output": output, "paths": paths})  # fmt: skip
    client.lpush(QUEUE, message)
    meta = result_of(client, task_id)
    assert meta["status"] == "SUCCESS", meta
    assert (meta["result"]["labeled"], meta["result"]["file"]) == (6, f"{output}/labels/part-000007.parquet")
    assert run_counts(client, "foreign") == {"images": 6, "done": 6, "failed": 0, "shards": 1, "shards_done": 1}
    import pyarrow.parquet as pq

    table = pq.read_table(meta["result"]["file"])
    assert sorted(table.column("path").to_pylist()) == sorted(paths)
    assert json.loads((run_output("foreign") / "shards" / "000007.json").read_text())["paths"] == paths
    # The same message again (a retrying producer) finds the shard done: no second row.
    again_id, _ = foreign_message("labeler.label_shard.v2", {})
    _, again = foreign_message("labeler.label_shard.v2",
                               {"run": "foreign", "shard": "000007", "output": output, "paths": paths}, again_id)  # fmt: skip
    client.lpush(QUEUE, again)
    assert result_of(client, again_id)["result"]["skipped"] == "done"
    assert pq.read_table(meta["result"]["file"]).num_rows == 6


def test_celery_caller_waits_on_its_own_result(contract_worker, redis_server, small_jpegs) -> None:
    from worker.celery_worker.app import create_app
    from worker.settings import Settings

    app = create_app(Settings(broker_url=redis_server.url, queue=QUEUE))
    summary = app.send_task("labeler.label_paths.v2", kwargs={"paths": small_jpegs[9:11]}).get(timeout=60)
    assert summary["labeled"] == 2
    assert {r["path"] for r in summary["records"]} == set(small_jpegs[9:11])


def test_a_job_of_the_retired_protocol_gets_a_clear_failure(contract_worker, redis_server, small_jpegs) -> None:
    client = redis.Redis.from_url(redis_server.url)
    task_id, message = foreign_message("labeler.label_chunk", {"run": "old", "paths": small_jpegs[:2]})
    client.lpush(QUEUE, message)
    meta = result_of(client, task_id)
    assert meta["status"] == "FAILURE"
    assert "no longer served" in meta["result"]["exc_message"][0]
    assert "labeler.label_shard.v2" in meta["result"]["exc_message"][0]
    wait_for(lambda: client.hlen("unacked") == 0, 30, "the old job acked, not redelivered")
    assert contract_worker.alive()


class _LeavesTrace:
    """Unpickling this creates the marker file: the trace a pickle exploit would leave."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_message_is_rejected_and_never_runs(
    contract_worker, redis_server, small_jpegs, tmp_path
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    marker = tmp_path / "pickle-ran"
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((_LeavesTrace(str(marker)),), {}, {"callbacks": None}))
    envelope = json.loads(foreign_message("labeler.label_paths.v2", {"paths": []}, task_id)[1])
    envelope.update(
        {
            "body": base64.b64encode(body).decode(),
            "content-type": "application/x-python-serialize",
            "content-encoding": "binary",
        }  # fmt: skip
    )
    client.lpush(QUEUE, json.dumps(envelope))
    # A JSON job published after it is labeled: the worker consumed the pickle and went on.
    after_id, message = foreign_message("labeler.label_paths.v2", {"paths": small_jpegs[5:7]})
    client.lpush(QUEUE, message)
    assert result_of(client, after_id)["status"] == "SUCCESS"
    assert not marker.exists()
    assert contract_worker.alive()
    assert client.get(f"celery-task-meta-{task_id}") is None
    assert "disallowed" in contract_worker.log().lower()
    wait_for(
        lambda: client.llen(QUEUE) == 0 and client.hlen("unacked") == 0, 30, "the pickle gone from Redis"
    )


def test_malformed_jobs_fail_clearly_without_harming_the_worker(contract_worker, redis_server, small_jpegs) -> None:
    from worker.celery_worker.app import create_app
    from worker.settings import Settings

    app = create_app(Settings(broker_url=redis_server.url, queue=QUEUE))
    bad = [
        ("labeler.label_shard.v2", {"run": "bad run name!", "shard": "000000", "output": "/tmp/x"}),
        ("labeler.label_shard.v2", {"run": "ok", "shard": "../../etc", "output": str(run_output("ok"))}),
        ("labeler.label_shard.v2", {"run": "ok", "shard": "000000", "output": "/etc/labeler-out"}),
        # this worker's output roots are folders: no bucket is under them, nor a key with `..`
        ("labeler.label_shard.v2", {"run": "ok", "shard": "000000", "output": "s3://labels/ok"}),
        ("labeler.label_shard.v2", {"run": "ok", "shard": "000000", "output": f"s3://{run_output('ok')}/../x"}),
        ("labeler.label_paths.v2", {"paths": "not-a-list"}),
    ]
    for task, kwargs in bad:
        with pytest.raises(Exception, match="refused"):
            app.send_task(task, kwargs=kwargs).get(timeout=60)
    assert "outside the output roots" in contract_worker.log()
    ok = app.send_task("labeler.label_paths.v2", kwargs={"paths": small_jpegs[7:8]}).get(timeout=60)
    assert ok["labeled"] == 1 and contract_worker.alive()


def test_cli_enqueue_waits_for_the_run_and_resumes(contract_worker, redis_server, small_jpegs, tmp_path) -> None:
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(small_jpegs[20:45]) + "\n")
    args = ["enqueue", f"@{listing}", "--run", "cli-run", "--broker", redis_server.url, "--queue", QUEUE,
            "--output", str(run_output("cli-run")), "--shard-size", "10", "--wait", "--interval", "0.2",
            "--no-progress"]  # fmt: skip
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines()[0] == "cli-run"  # the run id, alone on stdout
    assert "25 images in 3 shards, 25 queued in 3 shards" in first.stderr and "ETA finished" in first.stderr
    listing.write_text("\n".join(small_jpegs[20:60]) + "\n")  # the inputs changed since: the list stands
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "25 images in 3 shards (the run's stored shard list), 0 queued in 0 shards, 25 done" in again.stderr
    status = CliRunner().invoke(main, ["status", "cli-run", "--broker", redis_server.url])
    assert "done 25 (100.0%)" in status.stdout and "shards 3/3 done" in status.stdout
    out = tmp_path / "labels.jsonl"
    results = CliRunner().invoke(main, ["results", "cli-run", "--broker", redis_server.url, "--out", str(out)])
    assert results.exit_code == 0, results.output
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == sorted(small_jpegs[20:45])
    table = tmp_path / "labels.parquet"  # the dataset's own schema and rows, not a second format
    results = CliRunner().invoke(main, ["results", "cli-run", "--broker", redis_server.url, "--out", str(table)])
    assert results.exit_code == 0, results.output
    shards = sorted((run_output("cli-run") / "labels").glob("part-*.parquet"))
    assert pq.read_schema(table).equals(pq.read_schema(shards[0]), check_metadata=True)
    assert pq.read_table(table).equals(pa.concat_tables(pq.read_table(shard) for shard in shards))


def test_redis_requires_the_password(contract_worker, redis_server) -> None:
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port).ping()
    wrong = f"redis://:wrong-password@127.0.0.1:{redis_server.port}/0"
    result = CliRunner().invoke(main, ["status", "foreign", "--broker", wrong])
    assert result.exit_code == 1 and "Redis" in result.output and isinstance(result.exception, SystemExit)
    assert PASSWORD not in contract_worker.log()  # Celery masks the password in its banner and logs


def test_an_image_that_kills_its_worker_is_bisected_down_to_itself(redis_server, tiny_bundle, small_jpegs, tmp_path):
    """A prefork worker whose pool child dies on one image (test stand-in: poison_image.py): the
    shard is retried, then split in halves until that image is alone; it gets an internal_error
    row, its seven neighbours are labeled, and the worker goes on."""
    import shutil

    client = redis.Redis.from_url(redis_server.url)
    queue = "poison-test"
    poison = tmp_path / "poison.jpg"
    shutil.copy(small_jpegs[100], poison)
    paths = [str(poison), *small_jpegs[101:108]]
    env = worker_env(redis_server.url, tiny_bundle, queue=queue, max_attempts=2, lease_s=3, heartbeat_s=1)
    argv = [sys.executable, "-m", "worker", "worker", "--pool", "prefork", "--concurrency", "1",
            "--include", "poison_image", "-n", "poison@%h"]  # fmt: skip
    worker = CeleryWorker("poison", env, tmp_path, argv).start()
    try:
        from worker.client.enqueue import enqueue_run

        enqueue_run(client, "poison", paths, str(run_output("poison")), queue, shard_size=8)
        wait_run_done(client, "poison", 150)
        records = assert_exactly_once(client, "poison", paths)
        assert records[str(poison)]["error"]["code"] == "internal_error"
        assert "lost or failed" in records[str(poison)]["error"]["message"]
        assert all("labels" in records[p] for p in paths[1:])
        states = {s.shard_id: s.state for s in RunLedger(client).shard_states("poison")}
        assert states["000000"] == "split" and states["000000.0.0.0"] == "done"  # halved three times
        [dead] = RunLedger(client).dead_letters("poison")
        assert dead["shard"] == "000000.0.0.0" and str(poison) in dead["reason"]
        # The run's last shard ended with a give-up row: it gets its manifest all the same.
        manifest = wait_for(lambda: read_manifest(run_output("poison")), 30, "the poison run's manifest")
        assert manifest["counts"] == {"rows": 8, "labeled": 7, "failed": 1, "bytes": manifest["counts"]["bytes"],
                                      "shards": len(manifest["shards"])}  # fmt: skip
        assert worker.log().count("WorkerLostError") >= 4 and worker.alive()
        # The worker survived its crashing children and still labels.
        enqueue_run(client, "after-poison", small_jpegs[108:110], str(run_output("after-poison")), queue)
        wait_run_done(client, "after-poison", 90)
    finally:
        worker.stop()
