"""The ledger's recovery paths against a real redis-server, without workers: what the sweeper and
the reconciler give back, what an enqueue reads from storage, and what a run's failure does.
Each test here failed on main at af27960 (issue 18's findings 4, 5 and 6, orphans, storage)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from worker.celery_worker.leases import Sweeper
from worker.celery_worker.reconcile import Reconciler
from worker.client.enqueue import enqueue_run
from worker.dataset.files import DatasetSpec, shard_files, write_shard
from worker.dataset.manifest import read_manifest
from worker.dataset.shard_list import shard_source
from worker.ledger.ledger import RunLedger
from worker.ledger.messages import UNACKED, UNACKED_INDEX, shards_with_messages
from worker.ledger.states import State, Verdict
from worker.records import label_record

QUEUE = "q"
SPEC = DatasetSpec(model_sha256="ab" * 32, precision="fp32")
OWNER = "w1@host#1"


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def ledger(client: redis.Redis) -> RunLedger:
    return RunLedger(client)


def paths_for(tmp_path: Path, count: int) -> list[str]:
    return [str(tmp_path / "in" / f"img{i:04d}.jpg") for i in range(count)]


def finish_shard(ledger: RunLedger, run: str, output: Path, shard: str, owner: str = OWNER) -> None:
    """What a job does with a shard it holds: its file, then done."""
    rows = [label_record(p, [{"index": 1, "label": "x", "score": 0.5}]) for p in shard_source(output, shard)]
    written = write_shard(output, shard, rows, SPEC, worker="test")
    assert ledger.finish(run, shard, owner, written.labeled, written.failed)


def take(ledger: RunLedger, run: str, shard: str, owner: str = OWNER, lease_s: float = 30, held: int = 1):
    return ledger.claim(run, shard, owner, lease_s, 3, 10, held=held)


def test_a_deleted_runs_lease_entries_do_not_block_recovery_of_other_runs(ledger, client, tmp_path) -> None:
    """Finding 5: 150 lapsed entries of a run deleted by hand (docs/distributed.md's recipe) and
    one lost worker's shard of a live run: the sweeper gives the live one back and drops the rest."""
    ledger.create_run("gone", str(tmp_path / "gone"), 1, {}, QUEUE)
    ledger.register_shards("gone", [(f"{i:06d}", 1) for i in range(150)])
    for i in range(150):
        assert take(ledger, "gone", f"{i:06d}", lease_s=0.01).verdict == Verdict.RUN
    for key in client.scan_iter("labeler:run:gone:*"):
        client.delete(key)
    time.sleep(0.05)
    ledger.create_run("live", str(tmp_path / "live"), 1, {}, QUEUE)
    ledger.register_shards("live", [("000000", 1)])
    assert take(ledger, "live", "000000", lease_s=0.01).verdict == Verdict.RUN
    time.sleep(0.05)
    sweeper = Sweeper(lambda: ledger, QUEUE, 1.0)
    requeued = [pair for _ in range(3) for pair in sweeper.sweep_once()]
    assert requeued == [("live", "000000")]
    assert client.zcard(ledger.leases) == 0
    assert ledger.shard_state("live", "000000").state == State.QUEUED and client.llen(QUEUE) == 1


def test_a_worker_lost_with_several_shards_spends_none_of_their_attempts(ledger, tmp_path) -> None:
    """Finding 6: a worker SIGKILLed (preempted) while it held three shards is not evidence against
    any of them; a worker lost while it held one shard is (a poison image kills its worker); and
    losses of any kind are bounded, so a poison shard among others is still split in the end."""
    ledger.create_run("r", str(tmp_path / "r"), 10, {}, QUEUE)
    ledger.register_shards("r", [(f"{i:06d}", 10) for i in range(4)])
    for shard in ("000000", "000001", "000002"):
        take(ledger, "r", shard, lease_s=0.01, held=3)
    take(ledger, "r", "000003", owner="w2@host#2", lease_s=0.01, held=1)
    time.sleep(0.05)
    assert len(Sweeper(lambda: ledger, QUEUE, 1.0).sweep_once()) == 4
    states = {s.shard_id: s for s in ledger.shard_states("r")}
    assert [states[f"00000{i}"].attempts for i in range(4)] == [0, 0, 0, 1]
    assert all(state.losses == 1 for state in states.values())
    for _ in range(8):  # lost with its neighbours again and again: max losses (3 x 3) end it
        assert take(ledger, "r", "000000", lease_s=0.01, held=4).verdict == Verdict.RUN
        time.sleep(0.02)
        Sweeper(lambda: ledger, QUEUE, 1.0).sweep_once()
    assert take(ledger, "r", "000000", held=4).verdict == Verdict.EXHAUSTED


def test_the_reconciler_publishes_queued_shards_whose_message_was_lost(ledger, client, tmp_path) -> None:
    """Redis lost its last second of writes (or failed over to a replica that missed them): the
    ledger says queued but the message is gone. The reconciler publishes those once, and leaves
    alone shards whose message waits in the queue or was taken by a worker lately."""
    output = tmp_path / "run"
    summary = enqueue_run(client, "orphans", paths_for(tmp_path, 40), str(output), QUEUE, shard_size=10)
    assert summary.jobs == 4 and client.llen(QUEUE) == 4
    messages = client.lrange(QUEUE, 0, -1)
    client.delete(QUEUE)  # the lost writes
    client.rpush(QUEUE, messages[0])  # one message survived
    later = RunLedger(client, clock=lambda: time.time() + 120)  # two minutes on: past the orphan wait
    now = later.clock()  # one was taken by a worker just now, one by a worker that died long ago
    for tag, message, delivered in (("fresh", messages[1], now - 5), ("stale", messages[2], now - 3600)):
        client.hset(UNACKED, tag, json.dumps([json.loads(message), "", QUEUE]))
        client.zadd(UNACKED_INDEX, {tag: delivered})
    present = shards_with_messages(client, [QUEUE], now - 60)
    assert len(present) == 2
    reconciler = Reconciler(lambda: later, QUEUE, orphan_after_s=60.0, top_k=5)
    republished = reconciler.reconcile_once().republished
    assert len(republished) == 2 and not set(republished) & present
    assert client.llen(QUEUE) == 3
    assert reconciler.reconcile_once().republished == []  # each has a message now: nothing twice


def test_a_failed_run_waits_without_orphans_and_an_enqueue_resumes_it(ledger, client, tmp_path) -> None:
    """A job refused for the whole run marks it failed: claims answer run_failed and the queued
    shards wait (the reconciler does not publish them); enqueuing the run again clears the
    failure and publishes them."""
    output = tmp_path / "run"
    paths = paths_for(tmp_path, 20)
    enqueue_run(client, "f", paths, str(output), QUEUE, shard_size=10)
    client.delete(QUEUE)  # the refusing workers consumed (and acked) every message
    assert ledger.fail_run("f", "output outside the roots") and not ledger.fail_run("f", "another reason")
    status = ledger.status("f", QUEUE)
    assert status.failed_reason == "output outside the roots" and status.settled() and not status.finished()
    assert take(ledger, "f", "000000").verdict == Verdict.RUN_FAILED
    assert Reconciler(lambda: ledger, QUEUE, 0.0, 5).reconcile_once().republished == []
    again = enqueue_run(client, "f", paths, str(output), QUEUE, shard_size=10)
    assert again.jobs == 2 and ledger.status("f", QUEUE).failed_reason is None
    assert take(ledger, "f", "000000").verdict == Verdict.RUN


def test_a_wiped_ledger_does_not_relabel_shards_whose_files_are_on_storage(ledger, client, tmp_path) -> None:
    output = tmp_path / "run"
    paths = paths_for(tmp_path, 30)
    enqueue_run(client, "w", paths, str(output), QUEUE, shard_size=10)
    for shard in ("000000", "000001"):
        take(ledger, "w", shard)
        finish_shard(ledger, "w", output, shard)
    client.flushall()  # Redis wiped, or a new one
    again = enqueue_run(client, "w", paths, str(output), QUEUE, shard_size=10)
    assert (again.from_storage, again.jobs, again.queued) == (20, 1, 10)
    status = ledger.status("w", QUEUE)
    assert (status.total, status.done, status.shards_done) == (30, 20, 2)


def test_a_run_finished_while_an_enqueue_held_its_lease_gets_its_manifest(ledger, client, tmp_path) -> None:
    """Finding 4: the last shard finished while a re-enqueue held the enqueue lease, so its worker
    skipped the manifest; the reconciler writes it."""
    output = tmp_path / "run"
    enqueue_run(client, "m", paths_for(tmp_path, 20), str(output), QUEUE, shard_size=10)
    ledger.renew_enqueue_lease("m", 60)
    for shard in ("000000", "000001"):
        take(ledger, "m", shard)
        finish_shard(ledger, "m", output, shard)
    ledger.end_enqueue_lease("m")
    assert read_manifest(output) is None
    assert Reconciler(lambda: ledger, QUEUE, 60.0, 5).reconcile_once().manifests == ["m"]
    manifest = read_manifest(output)
    assert manifest["counts"]["rows"] == 20 and manifest["model"]["sha256"] == SPEC.model_sha256
    assert sorted(shard_files(output)) == ["000000", "000001"]
    assert ledger.runs_without_manifest() == []
