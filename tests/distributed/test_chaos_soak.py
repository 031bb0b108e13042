"""A short chaos soak (issue 18; the long one is bench/bench_chaos.py): two real workers on a real
redis-server with AOF, workers SIGKILLed at random moments and restarted, Redis SIGKILLed once and
restarted on its port and data folder; in the variants Redis comes back from a copy of its AOF
taken a second or more earlier (a host dying with its last second of writes unsynced), so the
ledger forgets shards that were done or running: a loss whose boundary falls between deliveries,
and one whose boundary falls between a worker taking a shard's message and claiming the shard.
Each run is followed to the end under a hard timeout (a hang fails), then its folder is read back:
one row per image, no error rows, no stray files, a manifest, and ledger counts that agree. Worker settings: tests/distributed/chaos_helpers.py.
"""

from __future__ import annotations

import pytest
from chaos_helpers import ChaosPlan, SoakReport, run_soak

pytestmark = pytest.mark.slow

IMAGES, SHARD_SIZE = 120, 10


def assert_invariants(report: SoakReport) -> None:
    """Everything a user may rely on after the chaos, each with the soak's evidence."""
    evidence = report.summary()
    assert not report.hung, evidence
    data = report.dataset
    assert (data.rows, data.distinct_paths, data.missing, data.unexpected) == (IMAGES, IMAGES, 0, 0), evidence
    assert data.duplicates == 0, evidence
    assert data.error_rows == 0, evidence
    assert data.stray_files == [], evidence
    assert data.manifest_present and data.manifest_rows == IMAGES, evidence
    ledger = report.ledger
    assert (ledger["images"], ledger["done"], ledger["failed"]) == (IMAGES, IMAGES, 0), evidence
    assert ledger["shards"] == ledger["shards_done"] == IMAGES // SHARD_SIZE, evidence
    assert report.failures() == [], evidence


def test_workers_and_redis_sigkilled_mid_run(tmp_path, tiny_bundle) -> None:
    plan = ChaosPlan(workers=2, kill_window_s=20, kill_every_s=7, redis_kills=1, timeout_s=75, seed=3)
    report = run_soak(tmp_path, tiny_bundle, plan, IMAGES, SHARD_SIZE, use_cli=False)
    print(report.summary())
    assert report.worker_kills >= 2 and report.redis_kills == 1, report.fault_log
    assert not report.finished_inside_window, "the run ended before every fault had landed"
    assert_invariants(report)


def test_redis_loses_its_last_writes(tmp_path, tiny_bundle) -> None:
    """The AOF copy is taken when no worker holds a shard's message unclaimed (the usual case)."""
    plan = ChaosPlan(
        workers=2, kill_window_s=16, kill_every_s=9, redis_kills=0, redis_losses=1, timeout_s=75, seed=4,
        loss_moment="between-deliveries",
    )  # fmt: skip
    report = run_soak(tmp_path, tiny_bundle, plan, IMAGES, SHARD_SIZE, use_cli=False)
    print(report.summary())
    assert report.redis_losses == 1 and report.worker_kills >= 1, report.fault_log
    (loss,) = report.forgotten
    assert loss["moment_found"] and (loss["done_forgotten"] or loss["claims_forgotten"]), loss
    assert_invariants(report)


def test_redis_loses_writes_between_a_delivery_and_its_claim(tmp_path, tiny_bundle) -> None:
    """The same loss, its boundary between a worker taking a shard's message and claiming the shard."""
    plan = ChaosPlan(
        workers=2, kill_window_s=16, kill_every_s=0, redis_kills=0, redis_losses=1, timeout_s=60, seed=4,
        loss_moment="at-delivery",
    )  # fmt: skip
    report = run_soak(tmp_path, tiny_bundle, plan, IMAGES, SHARD_SIZE, use_cli=False)
    print(report.summary())
    (loss,) = report.forgotten
    assert loss["moment_found"] and loss["delivered_unclaimed_at_copy"], loss
    assert_invariants(report)
