"""The queue contract and its security, against one real worker on a password-protected Redis:
a foreign producer (plain redis-py writing the protocol v2 message), a Celery caller waiting on its
result, pickle rejected unexecuted, malformed jobs, auth, and dead-lettering a job that crashes its worker.
"""

from __future__ import annotations

import base64
import json
import pickle
import sys
import uuid
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner
from crashing_tasks import CRASH_TASK
from distributed_helpers import PASSWORD, QUEUE, CeleryWorker, run_counts, wait_for, wait_run_done, worker_env

from worker.cli import main
from worker.client.enqueue import enqueue_paths
from worker.runs.protocol import TASK_NAME, job_message

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


def foreign_message(task_id: str, run: str, paths: list[str]) -> str:
    """The protocol v2 message exactly as docs/queue-contract.md spells it (no labeler or Celery code)."""
    body = [[], {"run": run, "paths": paths, "return_records": True},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]  # fmt: skip
    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {
                "lang": "py",
                "task": "labeler.label_chunk",
                "id": task_id,
                "root_id": task_id,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "eta": None,
                "expires": None,
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }  # fmt: skip
    )


def test_foreign_producer_with_plain_redis_py(contract_worker, redis_server, small_jpegs) -> None:
    client = redis.Redis.from_url(redis_server.url)
    paths = small_jpegs[:3]
    task_id = str(uuid.uuid4())
    client.lpush(QUEUE, foreign_message(task_id, "foreign", paths))
    raw = wait_for(lambda: client.get(f"celery-task-meta-{task_id}"), 60, "the job's result")
    meta = json.loads(raw)
    assert meta["status"] == "SUCCESS", meta
    assert [r["path"] for r in meta["result"]["records"]] == paths
    for path in paths:
        stored = json.loads(client.hget("labeler:run:foreign:records", path))
        assert len(stored["labels"]) == 5 and stored["labels"][0]["label"].startswith("class_")
    assert run_counts(client, "foreign") == {"total": 3, "done": 3, "failed": 0}


def test_celery_caller_waits_on_its_own_result(contract_worker, redis_server, small_jpegs) -> None:
    from worker.celery_worker.app import create_app
    from worker.runs.settings import Settings

    app = create_app(Settings(broker_url=redis_server.url, queue=QUEUE))
    result = app.send_task(
        TASK_NAME, kwargs={"run": "caller", "paths": small_jpegs[3:5], "return_records": True}
    )
    summary = result.get(timeout=60)
    assert summary["labeled"] == 2 and summary["skipped"] == 0
    assert {r["path"] for r in summary["records"]} == set(small_jpegs[3:5])
    # Sending the same images again is a no-op: they already have records.
    again = app.send_task(TASK_NAME, kwargs={"run": "caller", "paths": small_jpegs[3:5]}).get(timeout=60)
    assert again["skipped"] == 2 and again["labeled"] == 0


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
    envelope = json.loads(foreign_message(task_id, "pickled", []))
    envelope.update(
        {
            "body": base64.b64encode(body).decode(),
            "content-type": "application/x-python-serialize",
            "content-encoding": "binary",
        }  # fmt: skip
    )
    client.lpush(QUEUE, json.dumps(envelope))
    # A JSON job published after it is labeled: the worker consumed the pickle and went on.
    _, message = job_message("after-pickle", small_jpegs[5:7], QUEUE)
    client.lpush(QUEUE, message)
    wait_run_done(client, "after-pickle", 60)
    assert not marker.exists()
    assert contract_worker.alive()
    assert client.get(f"celery-task-meta-{task_id}") is None
    assert "disallowed" in contract_worker.log().lower()
    wait_for(
        lambda: client.llen(QUEUE) == 0 and client.hlen("unacked") == 0, 30, "the pickle gone from Redis"
    )


def test_malformed_job_fails_without_harming_the_worker(contract_worker, redis_server, small_jpegs) -> None:
    from worker.celery_worker.app import create_app
    from worker.runs.settings import Settings

    app = create_app(Settings(broker_url=redis_server.url, queue=QUEUE))
    bad = app.send_task(TASK_NAME, kwargs={"run": "bad run name!", "paths": "not-a-list"})
    with pytest.raises(Exception, match="malformed job"):
        bad.get(timeout=60)
    ok = app.send_task(TASK_NAME, kwargs={"run": "after-bad", "paths": small_jpegs[7:8]}).get(timeout=60)
    assert ok["labeled"] == 1 and contract_worker.alive()


def test_cli_enqueue_waits_for_the_run_and_resumes(
    contract_worker, redis_server, small_jpegs, tmp_path
) -> None:
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(small_jpegs[20:45]) + "\n")
    args = ["enqueue", f"@{listing}", "--run", "cli-run", "--broker", redis_server.url, "--queue", QUEUE,
            "--chunk-size", "10", "--wait", "--interval", "0.2", "--no-progress"]  # fmt: skip
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines()[0] == "cli-run"  # the run id, alone on stdout
    assert "25 queued in 3 jobs" in first.stderr and "ETA finished" in first.stderr
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "0 queued in 0 jobs, 25 already done" in again.stderr
    status = CliRunner().invoke(main, ["status", "cli-run", "--broker", redis_server.url])
    assert "done 25 (100.0%)" in status.stdout


def test_redis_requires_the_password(contract_worker, redis_server) -> None:
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port).ping()
    wrong = f"redis://:wrong-password@127.0.0.1:{redis_server.port}/0"
    result = CliRunner().invoke(main, ["status", "foreign", "--broker", wrong])
    assert result.exit_code == 1 and "Redis" in result.output and isinstance(result.exception, SystemExit)
    assert PASSWORD not in contract_worker.log()  # Celery masks the password in its banner and logs


def test_job_that_crashes_its_worker_is_dead_lettered(
    redis_server, tiny_bundle, small_jpegs, tmp_path
) -> None:
    """A prefork worker whose task kills its pool child: requeued twice, then dead-lettered."""
    client = redis.Redis.from_url(redis_server.url)
    queue = "crash-test"
    env = worker_env(redis_server.url, tiny_bundle, queue=queue, max_deliveries=2)
    argv = [sys.executable, "-m", "worker", "worker", "--pool", "prefork", "--concurrency", "1",
            "--include", "crashing_tasks", "-n", "crash@%h"]  # fmt: skip
    worker = CeleryWorker("crash", env, tmp_path, argv).start()
    try:
        paths = small_jpegs[10:14]
        envelope = json.loads(job_message("poison", paths, queue)[1])
        envelope["headers"]["task"] = CRASH_TASK
        client.lpush(queue, json.dumps(envelope))
        wait_for(lambda: client.llen("labeler:run:poison:dead") == 1, 90, "the job to be dead-lettered")
        [entry] = [json.loads(x) for x in client.lrange("labeler:run:poison:dead", 0, -1)]
        assert entry["deliveries"] == 2 and entry["paths"] == paths and "lost" in entry["reason"]
        assert run_counts(client, "poison") == {"total": 4, "done": 4, "failed": 4}
        record = json.loads(client.hget("labeler:run:poison:records", paths[0]))
        assert record["error"]["code"] == "internal_error" and "dead-lettered" in record["error"]["message"]
        assert worker.log().count("WorkerLostError") >= 2
        # The worker survived its crashing children and still labels.
        enqueue_paths(client, "after-poison", small_jpegs[14:16], queue)
        wait_run_done(client, "after-poison", 90)
    finally:
        worker.stop()
