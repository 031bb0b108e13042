"""Recovery after a SIGKILLed worker, with the default lease settings: how long its shards wait.

    python bench/bench_recovery.py [--images 3000] [--shard-size 150] [--rounds 3] [--model BUNDLE]

Two real workers (`python -m worker worker`, concurrency 4, every LABELER_* setting at its default:
lease 30 s, heartbeat 10 s, sweep 5 s, visibility timeout 3600 s) on a private redis-server (AOF
everysec), the tests' tiny ResNet-50 bundle (built once unless --model), small JPEGs. Per round a
run is enqueued; once a third of it is done and the victim holds shards, the victim's process
group is SIGKILLed. The ledger is polled every 0.1 s: for each shard the victim held, the time
from the kill until its lease lapses (by the lease's own expiry), until the sweeper queues it
again, until it runs again on the other worker, and until it is done. The bound to beat: 60 s.
After each round: exactly one Parquet row per path and the ledger's counts; Redis bytes of the
finished run (every key of the run, Celery's job results of it) per image.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # this checkout, not an installed copy
from common import (  # noqa: E402
    LabelerWorker,
    RedisServer,
    machine_description,
    machine_load,
    print_medians,
    tiny_bundle,
    wait_for,
    worker_env,
)

QUEUE = "labeler"


def small_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """`count` 128x96 JPEGs of smooth random colour (quality 90)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = cv2.resize(
            rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (128, 96), interpolation=cv2.INTER_CUBIC
        )
        path = folder / f"small{index:05d}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    return paths


def shard_states(ledger, run: str) -> dict[str, object]:
    return {state.shard_id: state for state in ledger.shard_states(run)}


def one_round(server: RedisServer, env: dict[str, str], tmp: Path, paths: list[str], shard_size: int,
              number: int, survivor: LabelerWorker) -> dict[str, float]:  # fmt: skip
    from worker.client.enqueue import enqueue_run
    from worker.dataset.files import iter_records
    from worker.ledger.ledger import RunLedger

    client = server.client()
    ledger = RunLedger(client)
    victim = LabelerWorker(f"victim{number}", env, tmp).start()
    run = f"recovery-{number}"
    output = tmp / "runs" / run
    started = time.monotonic()
    enqueue_run(client, run, paths, str(output), QUEUE, shard_size)

    def victim_holds() -> dict[str, object] | None:
        states = shard_states(ledger, run)
        done = sum(s.images for s in states.values() if s.state == "done")
        held = {
            k: s for k, s in states.items() if s.state == "running" and s.owner.startswith(victim.name + "@")
        }
        return held if held and done >= len(paths) // 3 else None

    held = wait_for(
        victim_holds, 600, "the victim to hold shards with a third of the run done", interval=0.05
    )
    victim.kill()
    killed_at, killed_wall = time.monotonic(), time.time()
    lapse = {k: s.lease_until - killed_wall for k, s in held.items()}
    requeued: dict[str, float] = {}
    running: dict[str, float] = {}
    done: dict[str, float] = {}
    while len(done) < len(held):
        now = time.monotonic() - killed_at
        if now > 600:
            raise TimeoutError(f"shards {sorted(set(held) - set(done))} not done 600 s after the kill")
        for shard_id in held:
            state = ledger.shard_state(run, shard_id)
            if state.state != "running" or not state.owner.startswith(victim.name + "@"):
                requeued.setdefault(shard_id, now)
            if state.state == "running" and state.owner.startswith(survivor.name + "@"):
                running.setdefault(shard_id, now)
            if state.state == "done":
                running.setdefault(shard_id, now)  # ran and finished between two polls
                done[shard_id] = now
        time.sleep(0.1)
    status = wait_for(lambda: (s := ledger.status(run, QUEUE)).finished() and s, 600, "the run to finish")
    total_s = time.monotonic() - started
    rows = list(iter_records(output))
    assert len(rows) == len({r["path"] for r in rows}) == len(paths), (len(rows), len(paths))
    assert status.total == status.done == len(paths), status
    run_keys = sum(
        int(client.memory_usage(k, samples=0) or 0) for k in client.scan_iter(match=f"labeler:run:{run}:*")
    )
    results = 0
    for key in client.scan_iter(match="celery-task-meta-*"):
        value = client.get(key) or b""
        if f'"run": "{run}"'.encode() in value or f'"run":"{run}"'.encode() in value:
            results += int(client.memory_usage(key, samples=0) or 0)
    for shard_id in sorted(held):
        print(f"    shard {shard_id}: lease lapses {lapse[shard_id]:5.1f} s after the kill, queued again "
              f"{requeued[shard_id]:5.1f} s, running on {survivor.name} {running[shard_id]:5.1f} s, "
              f"done {done[shard_id]:5.1f} s")  # fmt: skip
    out = {"shards_held": len(held), "running_again_max_s": max(running.values()), "done_max_s": max(done.values()),
           "requeued_max_s": max(requeued.values()), "lapse_max_s": max(lapse.values()), "run_s": total_s,
           "run_bytes_per_image": run_keys / len(paths), "result_bytes_per_image": results / len(paths)}  # fmt: skip
    print(f"  round {number + 1}: {len(held)} shards held by the killed worker; all running again on "
          f"{survivor.name} {out['running_again_max_s']:.1f} s after the kill, all done {out['done_max_s']:.1f} s; "
          f"run of {len(paths)} images {total_s:.0f} s; one row per path; Redis after: run keys "
          f"{out['run_bytes_per_image']:.2f} B/image, Celery job results {out['result_bytes_per_image']:.2f} B/image")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, help="bundle (default: the tests' tiny ResNet-50, built here)")
    args = parser.parse_args()
    print(f"machine: {machine_description()}, {machine_load()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundle = args.model or tiny_bundle(tmp / "bundles")
        paths = small_jpegs(tmp / "images", args.images)
        server = RedisServer(tmp / "redis").start()
        env = worker_env(server.url, bundle, tmp / "runs")
        survivor = LabelerWorker("survivor", env, tmp)
        results = []
        try:
            survivor.start()
            print(
                f"{args.images} images, shards of {args.shard_size}, bundle {bundle}; worker settings: defaults"
            )
            for number in range(args.rounds):
                results.append(one_round(server, env, tmp, paths, args.shard_size, number, survivor))
        finally:
            survivor.stop()
            server.stop()
    print(f"after: {machine_load()}")
    print_medians(results)
    worst = max(r["done_max_s"] for r in results)
    print(f"worst kill-to-done over {len(results)} rounds: {worst:.1f} s (target: within 60 s)")


if __name__ == "__main__":
    main()
