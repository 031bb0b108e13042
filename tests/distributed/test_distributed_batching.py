"""Images of concurrent jobs share engine batches.

Batch sizes are not visible from outside a worker, so this runs several jobs (`PathsJob.label`) in
threads of one worker process, exactly as the threads pool does, against the real labeling service
of that process, and reads the service's batch sizes.
"""

from __future__ import annotations

import threading

from worker.celery_worker.app import create_app
from worker.celery_worker.job import PathsJob
from worker.celery_worker.process import WorkerProcess
from worker.settings import Settings


def test_concurrent_jobs_share_engine_batches(redis_url, tiny_bundle, small_jpegs) -> None:
    process = WorkerProcess(create_app(Settings(broker_url=redis_url, model=str(tiny_bundle), batch_size=32,
                                                max_wait_ms=400, decode_threads=2, intra_op_threads=1)))  # fmt: skip
    try:
        service = process.service()
        jobs = [small_jpegs[i * 3 : (i + 1) * 3] for i in range(6)]
        results: list[dict] = []
        threads = [
            threading.Thread(
                target=lambda paths=paths: results.append(PathsJob(process, {"paths": paths}).label())
            )
            for paths in jobs
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(r["labeled"] for r in results) == [3] * 6
        assert service.batch_stats.largest > 3, service.batch_stats  # one batch held several jobs' images
        assert service.batch_stats.images == 18
        assert sorted(r["path"] for result in results for r in result["records"]) == sorted(small_jpegs[:18])
    finally:
        process.close()
