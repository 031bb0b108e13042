"""Enqueueing a million paths as a run of shards, and what it costs Redis, against the design before it.

    python bench/bench_enqueue.py [--paths 1000000] [--shard-size 5000] [--rounds 3] [--skip-old]

Every case gets its own private redis-server (password, AOF everysec, as deploy configures it;
data under the system temp dir) and its own output folder; paths are synthetic strings (enqueue
never opens them). Per round:
1. Baseline, the design before issue 11 (commit 0301840, `enqueue_paths`, chunks of 500, one
   Redis hash entry per path), run from a `git archive` of that commit in a subprocess on the
   same paths: its time, and its Redis memory per queued image.
2. `enqueue_run`, queue not consumed (no workers): time, paths/s, ratio against the baseline, and
   Redis `used_memory` peak above the empty server (INFO memory sampled every 10 ms in a thread).
3. The same with the queue consumed as fast as it fills (a thread BRPOPs it, as idle workers do).
4. Backpressure: `--max-queued 20`, a consumer taking one shard every 25 ms; the queue and the
   peak stay bounded by (max_queued_jobs + one publish batch) x message size.
5. Enqueueing run 2 again (stored list reused; its shards are queued, so each is published again),
   then marking every shard done through the ledger's own Lua (claim + finish, as workers do, and
   the per-worker activity a worker writes with each flush), and enqueueing it once more (nothing
   published). Redis bytes per image of the finished run: `MEMORY USAGE` of every key of the run,
   the global lease set and the run's share of the run set, divided by its images.
6. An enqueue killed (SIGKILL, a subprocess) once half its shards are written, then resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # this checkout, not an installed copy
from common import RedisServer, machine_description, machine_load, print_medians, wait_for  # noqa: E402

BASELINE_COMMIT = "0301840"
QUEUE = "labeler"

_OLD_ENQUEUE = """
import sys, time, redis
from worker.client.enqueue import enqueue_paths
url, count = sys.argv[1], int(sys.argv[2])
paths = [f"/data/images/{i // 1000:05d}/img_{i:08d}.jpg" for i in range(count)]
client = redis.Redis.from_url(url)
before = int(client.info("memory")["used_memory"])
started = time.perf_counter()
summary = enqueue_paths(client, "old", paths, "labeler", 500, max_queued_jobs=10**9)
elapsed = time.perf_counter() - started
assert summary.queued == count, summary
print(elapsed, int(client.info("memory")["used_memory"]) - before)
"""


def synthetic_paths(count: int) -> list[str]:
    return [f"/data/images/{i // 1000:05d}/img_{i:08d}.jpg" for i in range(count)]


class Background:
    """A thread running `step()` until the `with` block ends."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.step()

    def step(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class MemorySampler(Background):
    """Polls `INFO memory` and the queue length every `interval_s`; keeps the maxima."""

    def __init__(self, server: RedisServer, queue: str, interval_s: float = 0.01) -> None:
        super().__init__()
        self.client = server.client()
        self.queue = queue
        self.interval_s = interval_s
        self.base = int(self.client.info("memory")["used_memory"])
        self.peak = self.base
        self.peak_queue = 0

    def sample(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.info("memory")
        pipe.llen(self.queue)
        info, length = pipe.execute()
        self.peak = max(self.peak, int(info["used_memory"]))
        self.peak_queue = max(self.peak_queue, int(length))

    def step(self) -> None:
        self.sample()
        self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.sample()  # the last publish may come after the last poll

    @property
    def peak_above_base(self) -> int:
        return self.peak - self.base


class Consumer(Background):
    """Takes messages off the queue like idle workers would: as fast as they come, or one per `every_s`."""

    def __init__(self, server: RedisServer, queue: str, every_s: float = 0.0) -> None:
        super().__init__()
        self.client = server.client()
        self.queue = queue
        self.every_s = every_s
        self.taken = 0

    def step(self) -> None:
        if self.client.brpop([self.queue], timeout=0.2):
            self.taken += 1
            if self.every_s:
                time.sleep(self.every_s)


class Case:
    """A fresh redis-server and output folder for one measurement."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.folder = tmp / name
        self.server = RedisServer(self.folder / "redis")
        self.output = self.folder / "out"

    def __enter__(self) -> Case:
        self.server.start()
        self.client = self.server.client()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def old_design(tmp: Path, old_tree: Path, count: int) -> tuple[float, int]:
    """(seconds, Redis bytes added) of the design before issue 11, on the same paths."""
    with Case(tmp, "old") as case:
        env = dict(os.environ, PYTHONPATH=str(old_tree))
        done = subprocess.run([sys.executable, "-c", _OLD_ENQUEUE, case.server.url, str(count)], env=env,
                              cwd=old_tree, capture_output=True, text=True, check=True)  # fmt: skip
        elapsed, added = done.stdout.split()
        return float(elapsed), int(added)


def enqueue(
    case: Case, run: str, paths: list[str], shard_size: int, max_queued: int = 1000, poll_s: float = 0.5
):
    from worker.client.enqueue import enqueue_run

    started = time.perf_counter()
    summary = enqueue_run(
        case.client, run, paths, str(case.output), QUEUE, shard_size, max_queued, poll_s=poll_s
    )
    return time.perf_counter() - started, summary


def key_bytes(client, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


def finish_every_shard(client, run: str, images_per_s: float = 3000.0, flush: int = 256) -> None:
    """What workers do to a run, without labeling: claim + finish each shard (the ledger's Lua) and the
    per-worker activity of each flush of `flush` records, two workers, at `images_per_s`."""
    from worker.ledger import activity
    from worker.ledger.ledger import RunLedger

    ledger = RunLedger(client)
    now = time.time()
    record = [{"path": "x"}] * flush
    states = list(ledger.shard_states(run))
    for index, state in enumerate(sorted(states, key=lambda s: s.shard_id)):
        worker = f"labeler-gpu{index % 2}@node{index % 2}"
        owner = f"{worker}#{index:012x}"
        claim = ledger.claim(run, state.shard_id, owner, 30.0, 3, state.images)
        assert claim.verdict == "run", claim
        for start in range(0, state.images, flush):
            now += min(flush, state.images - start) / images_per_s
            activity.note_records(client, "labeler", run, worker, record[: state.images - start], now=now)
        failed = state.images // 200  # 0.5 % error rows
        assert ledger.finish(run, state.shard_id, owner, state.images - failed, failed)


def finished_run_bytes(client, run: str) -> dict[str, int]:
    """Redis bytes of a finished run: every key of it, the global lease set, its share of the run set."""
    sizes = {
        key.decode(): key_bytes(client, key)
        for key in client.scan_iter(match=f"labeler:run:{run}:*", count=1000)
    }
    sizes["labeler:leases"] = key_bytes(client, "labeler:leases")
    runs = client.scard("labeler:runs") or 1
    sizes["labeler:runs (share)"] = key_bytes(client, "labeler:runs") // runs
    return sizes


def killed_enqueue(case: Case, run: str, count: int, shard_size: int) -> tuple[int, float]:
    """Start an enqueue in a subprocess, SIGKILL it once half the shards are written; returns
    (shard files written when killed, seconds it ran)."""
    child = [sys.executable, __file__, "--child-enqueue", case.server.url, str(case.output), run, str(count),
             str(shard_size)]  # fmt: skip
    process = subprocess.Popen(child, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    started = time.perf_counter()
    half = count // shard_size // 2
    shards = case.output / "shards"

    def written() -> int:
        return sum(1 for p in shards.glob("*.json") if p.name != "index.json") if shards.is_dir() else 0

    wait_for(lambda: written() >= half or process.poll() is not None, 300, "half the shards", interval=0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return written(), time.perf_counter() - started


def child_enqueue(url: str, output: str, run: str, count: int, shard_size: int) -> None:
    import redis

    from worker.client.enqueue import enqueue_run

    enqueue_run(redis.Redis.from_url(url), run, synthetic_paths(count), output, QUEUE, shard_size)


def one_round(tmp: Path, old_tree: Path | None, paths: list[str], shard_size: int) -> dict[str, float]:
    count = len(paths)
    out: dict[str, float] = {}
    if old_tree is not None:
        out["old_s"], added = old_design(tmp, old_tree, count)
        out["old_bytes_per_image"] = added / count
        print(f"  baseline (0301840 enqueue_paths): {out['old_s']:6.2f} s  {count / out['old_s']:9.0f} paths/s  "
              f"Redis {added / count:.0f} B per queued image")  # fmt: skip

    with Case(tmp, "not-consumed") as case:
        with MemorySampler(case.server, QUEUE) as memory:
            elapsed, summary = enqueue(case, "bench", paths, shard_size)
        assert summary.queued == count and summary.jobs == summary.shards, summary
        message = key_bytes(case.client, QUEUE) / max(1, case.client.llen(QUEUE))
        out.update(new_s=elapsed, peak_not_consumed=memory.peak_above_base, message_bytes=message,
                   shards_hash=key_bytes(case.client, "labeler:run:bench:shards"))  # fmt: skip
        ratio = f", {elapsed / out['old_s']:.2f}x the baseline's time" if "old_s" in out else ""
        print(f"  enqueue_run, not consumed: {elapsed:6.2f} s  {count / elapsed:9.0f} paths/s  ({summary.shards} "
              f"shards{ratio}); Redis peak +{memory.peak_above_base / 1024:.0f} KiB, queue {memory.peak_queue} "
              f"messages of {message:.0f} B, shards hash {out['shards_hash'] / 1024:.1f} KiB")  # fmt: skip

        again, summary = enqueue(case, "bench", paths, shard_size)
        assert summary.reused_list and summary.seen == count, summary
        out["again_queued_s"] = again
        print(
            f"  enqueue again, shards still queued: {again:5.2f} s ({summary.jobs} published again: not done)"
        )

        case.client.delete(QUEUE)  # the workers took them
        started = time.perf_counter()
        finish_every_shard(case.client, "bench")
        finishing = time.perf_counter() - started
        sizes = finished_run_bytes(case.client, "bench")
        out["finished_bytes_per_image"] = sum(sizes.values()) / count
        print(f"  finished run ({count} images, claim + finish of {summary.shards} shards in {finishing:.1f} s): "
              f"{out['finished_bytes_per_image']:.3f} B/image; "
              + ", ".join(f"{k.split(':')[-1]} {v} B" for k, v in sizes.items()))  # fmt: skip

        again, summary = enqueue(case, "bench", paths, shard_size)
        assert summary.reused_list and summary.jobs == 0 and summary.skipped == count, summary
        out["again_done_s"] = again
        print(f"  enqueue again, every shard done: {again:5.2f} s ({summary.jobs} published)")

    with Case(tmp, "consumed") as case, Consumer(case.server, QUEUE):
        with MemorySampler(case.server, QUEUE) as memory:
            elapsed, summary = enqueue(case, "bench", paths, shard_size)
        out.update(consumed_s=elapsed, peak_consumed=memory.peak_above_base)
        print(f"  enqueue_run, consumed:     {elapsed:6.2f} s  {count / elapsed:9.0f} paths/s; Redis peak "
              f"+{memory.peak_above_base / 1024:.0f} KiB, queue at most {memory.peak_queue} messages")  # fmt: skip

    with Case(tmp, "backpressure") as case, Consumer(case.server, QUEUE, every_s=0.025):
        with MemorySampler(case.server, QUEUE) as memory:
            elapsed, summary = enqueue(case, "bench", paths, shard_size, max_queued=20, poll_s=0.05)
        out.update(peak_backpressure=memory.peak_above_base, queue_backpressure=memory.peak_queue)
        print(f"  backpressure (max 20 queued, one shard taken per 25 ms): {elapsed:5.2f} s ({summary.waited_s:.1f} s "
              f"waiting); Redis peak +{memory.peak_above_base / 1024:.0f} KiB, queue at most {memory.peak_queue}")  # fmt: skip

    with Case(tmp, "killed") as case:
        written, ran = killed_enqueue(case, "bench", count, shard_size)
        queued_before = case.client.llen(QUEUE)
        elapsed, summary = enqueue(case, "bench", paths, shard_size)
        meta = {k.decode(): v.decode() for k, v in case.client.hgetall("labeler:run:bench:meta").items()}
        assert int(meta["images"]) == count and int(meta["shards"]) == summary.shards, meta
        assert json.loads((case.output / "shards" / "index.json").read_text())["images"] == count
        out["resume_s"] = elapsed
        print(f"  killed after {ran:.1f} s with {written} shard files written ({queued_before} published); resumed "
              f"in {elapsed:5.2f} s: {summary.shards} shards, {summary.jobs} published, ledger counts "
              f"{meta['images']} images once")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--paths", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-old", action="store_true", help="no baseline (the old design)")
    parser.add_argument("--child-enqueue", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_enqueue:
        url, output, run, count, shard_size = args.child_enqueue
        child_enqueue(url, output, run, int(count), int(shard_size))
        return
    print(f"machine: {machine_description()}, {machine_load()}")
    paths = synthetic_paths(args.paths)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old_tree = None
        if not args.skip_old:
            old_tree = tmp / "old-tree"
            old_tree.mkdir()
            archive = subprocess.run(["git", "archive", BASELINE_COMMIT, "worker"], cwd=REPO, capture_output=True,
                                     check=True).stdout  # fmt: skip
            subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
        rounds = []
        for number in range(args.rounds):
            print(f"round {number + 1} ({machine_load()}):")
            rounds.append(one_round(tmp, old_tree, paths, args.shard_size))
    print(f"after: {machine_load()}")
    print(f"medians (range) over {len(rounds)} rounds, {args.paths} paths, shards of {args.shard_size}:")
    print_medians(rounds)
    if "old_s" in rounds[0]:
        ratios = [r["new_s"] / r["old_s"] for r in rounds]
        print(
            f"  time enqueue_run / baseline: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
