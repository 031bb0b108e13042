"""A chaos soak of the distributed labeler, shared by tests/distributed/test_chaos_soak.py (short)
and bench/bench_chaos.py (long): real worker processes on a real redis-server with AOF, workers
SIGKILLed at random and restarted, Redis SIGKILLed and restarted on its port and data folder (or
restarted from a copy of its AOF taken a moment earlier: Redis losing its last writes), the run
followed to the end under a hard timeout, then the dataset read back as a user would.

The parts: `ChaosPlan` (what to break, when: a schedule drawn from a seed), `Fleet` (the worker
processes, each restart a new incarnation with its own log), `ChaosSoak` (the loop that breaks
things and follows the run), `check_dataset` (the folder read back with pyarrow) and
`SoakReport` (the figures and every invariant that failed, with evidence).
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from distributed_helpers import REPO, CeleryWorker, RedisServer, small_crops

WORKER, REDIS_KILL, REDIS_LOSS = "worker", "redis", "redis-loss"
# Worker log lines worth counting: what the workers did about the faults.
LOG_SIGNS = {
    "handed_back": "handed back:",
    "lease_lost": "lease lost",
    "requeued_by_sweeper": "lost its worker; queued again",
    "finished_twice": "finished by another worker too",
    "redis_retry": "Redis error during",
    "redis_gave_up": "handing the job back",
    "broker_lost": "Connection to broker lost",
    "split": "split in two",
    "error_row": "gets an error row",
    "no_manifest": "no manifest written",
    "job_failed": "failed, requeueing",
    "refused": "refused:",
    "traceback": "Traceback (most recent call last)",
}
_LOG_LEVEL = re.compile(r": (ERROR|CRITICAL)/")


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the run was enqueued
    kind: str  # WORKER, REDIS_KILL or REDIS_LOSS


@dataclass(frozen=True)
class ChaosPlan:
    """What to break and when. Worker kills come every `kill_every_s` on average (0.5x-1.5x, drawn
    from `seed`) inside the first `kill_window_s` seconds of the run; each Redis crash at a random
    moment of the window's middle. A `redis_losses` crash restarts Redis from a copy of its AOF taken
    at least `lose_window_s` earlier, and only once a shard has finished since the copy. The copy's
    instant (`loss_moment`): wherever it falls (`any`), when no worker holds a shard's message
    without having claimed the shard yet (`between-deliveries`), or when one does (`at-delivery`:
    a boundary a real loss falls on now and then, made certain here)."""

    workers: int = 3
    kill_window_s: float = 120.0
    kill_every_s: float = 20.0
    redis_kills: int = 1
    redis_losses: int = 0
    lose_window_s: float = 1.0
    loss_moment: str = "any"  # where a loss's boundary falls: any, between-deliveries or at-delivery
    restart_delay_s: tuple[float, float] = (0.5, 2.0)
    redis_down_s: tuple[float, float] = (0.5, 2.0)
    timeout_s: float = 600.0  # from the enqueue: a run not finished by then hangs
    manifest_grace_s: float = 20.0  # the ledger says finished: the manifest must follow within this
    seed: int = 0

    def schedule(self) -> list[Fault]:
        rng = random.Random(self.seed)
        faults = []
        at = rng.uniform(0.5, 1.5) * self.kill_every_s
        while self.kill_every_s > 0 and at < self.kill_window_s:
            faults.append(Fault(round(at, 2), WORKER))
            at += rng.uniform(0.5, 1.5) * self.kill_every_s
        crashes = [REDIS_KILL] * self.redis_kills + [REDIS_LOSS] * self.redis_losses
        rng.shuffle(crashes)
        for i, kind in enumerate(crashes):  # one per equal slice of the window's middle 70 %
            low = 0.15 + 0.7 * i / len(crashes)
            high = 0.15 + 0.7 * (i + 1) / len(crashes)
            faults.append(Fault(round(rng.uniform(low, high) * self.kill_window_s, 2), kind))
        return sorted(faults, key=lambda fault: fault.at_s)


class ChaosWorker(CeleryWorker):
    """A worker incarnation started without waiting for it (the soak goes on meanwhile)."""

    def spawn(self) -> ChaosWorker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return self

    def ready(self) -> bool:
        return self.alive() and " ready." in self.log()


class Fleet:
    """`count` worker slots; a killed slot's next incarnation is `w<i>-<n>`, with its own log."""

    def __init__(
        self, count: int, env: dict[str, str], log_dir: Path, argv_extra: list[str] | None = None
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.argv_extra = argv_extra or []
        self.generations = [0] * count
        self.workers: list[ChaosWorker | None] = [None] * count
        self.all: list[ChaosWorker] = []

    def spawn(self, slot: int) -> ChaosWorker:
        self.generations[slot] += 1
        name = f"w{slot + 1}-{self.generations[slot]}"
        argv = [sys.executable, "-m", "worker", "worker", "-n", f"{name}@%h", "-l", "INFO", *self.argv_extra]
        worker = ChaosWorker(name, self.env, self.log_dir, argv).spawn()
        self.workers[slot] = worker
        self.all.append(worker)
        return worker

    def start(self, ready_timeout: float = 120) -> None:
        for slot in range(len(self.workers)):
            self.spawn(slot)
        deadline = time.monotonic() + ready_timeout
        for worker in self.workers:
            while not worker.ready():
                if not worker.alive():
                    raise AssertionError(f"worker {worker.name} exited early:\n{worker.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker {worker.name} not ready after {ready_timeout:.0f} s")
                time.sleep(0.2)

    def ready_slots(self) -> list[int]:
        return [slot for slot, worker in enumerate(self.workers) if worker is not None and worker.ready()]

    def kill(self, slot: int) -> str:
        worker = self.workers[slot]
        worker.kill()
        self.workers[slot] = None
        return worker.name

    def stop(self) -> None:
        """Warm shutdown of every living incarnation at once; SIGKILL what outlasts 30 s."""
        living = [worker for worker in self.all if worker.alive()]
        for worker in living:
            worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for worker in living:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()

    def log_summary(self) -> dict[str, Any]:
        """How often each sign appears over every incarnation's log, and the first error lines."""
        counts = dict.fromkeys(LOG_SIGNS, 0)
        errors: list[str] = []
        for worker in self.all:
            for line in worker.log().splitlines():
                for key, sign in LOG_SIGNS.items():
                    if sign in line:
                        counts[key] += 1
                if _LOG_LEVEL.search(line) and len(errors) < 20:
                    errors.append(f"{worker.name}: {line.strip()[:300]}")
        return {"counts": counts, "error_lines": errors}

    def grep(self, needles: Iterable[str], most: int = 40) -> list[str]:
        """Log lines naming any of `needles` (shard ids), across incarnations."""
        wanted = [needle for needle in needles if needle]
        found = []
        for worker in self.all:
            for line in worker.log().splitlines():
                if any(needle in line for needle in wanted):
                    found.append(f"{worker.name}: {line.strip()[:500]}")
        return found[-most:]


# -- Redis faults ------------------------------------------------------------------------------


def crash_redis(server: RedisServer) -> None:
    """SIGKILL redis-server: no shutdown save, the AOF as it stands on disk."""
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait(15)
    server.process = None


def snapshot_aof(
    server: RedisServer,
    into: Path,
    moment: Callable[[redis.Redis], Any] | None = None,
    within_s: float = 30.0,
) -> Any:
    """Copy the AOF folder (or file) into `into` with writes paused, so the copy is a prefix of the
    write history, as a host losing its unsynced last second leaves. With `moment`, wait (up to
    `within_s`) for an instant when `moment(client)` is truthy, asked under the same pause, and
    copy then. Returns what `moment` said (True without one); None: no such instant, no copy."""
    client = server.client()
    deadline = time.monotonic() + within_s
    while True:
        client.client_pause(5000, all=False)  # WRITE pause: reads go on, nothing new reaches the AOF
        try:
            found = moment(client) if moment else True
            if found:
                shutil.rmtree(into, ignore_errors=True)
                into.mkdir(parents=True)
                for item in server.data_dir.iterdir():
                    if item.name.startswith("appendonly"):
                        copy = shutil.copytree if item.is_dir() else shutil.copy2
                        copy(item, into / item.name)
                return found
        finally:
            client.client_unpause()
        if time.monotonic() > deadline:
            return None
        time.sleep(0.003)


def delivered_unclaimed(run: str, queue: str) -> Callable[[redis.Redis], list[str]]:
    """A `moment` for snapshot_aof: shards of `run` whose message a worker has taken (it waits in
    `unacked`, none in the queue) but which the ledger still has as queued: claims about to come."""

    def shards(client: redis.Redis) -> list[str]:
        places = message_places(client, queue)
        picture = shard_picture(client, run)
        return sorted(
            shard
            for shard, where in places.items()
            if "queue" not in where and picture.get(shard, {}).get("s") == "queued"
        )

    return shards


def restore_aof(server: RedisServer, snapshot: Path) -> None:
    """Put the copied AOF back in place of the current one (redis-server must be down)."""
    for item in server.data_dir.iterdir():
        if item.name.startswith("appendonly"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    for item in snapshot.iterdir():
        copy = shutil.copytree if item.is_dir() else shutil.copy2
        copy(item, server.data_dir / item.name)


# -- reading the ledger and the queue ---------------------------------------------------------------


def shard_picture(client: redis.Redis, run: str) -> dict[str, dict[str, Any]]:
    """Every shard's state as the ledger holds it now: id -> its small JSON, decoded."""
    raw = client.hgetall(f"labeler:run:{run}:shards")
    return {key.decode(): json.loads(value) for key, value in raw.items()}


def _message_shard(raw: bytes | str) -> str | None:
    """The shard a Celery message (queue entry or `unacked` value) carries, if any."""
    try:
        data = json.loads(raw)
        envelope = data[0] if isinstance(data, list) else data
        if isinstance(envelope, str):
            envelope = json.loads(envelope)
        body = json.loads(base64.b64decode(envelope["body"]))
        return body[1].get("shard")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def message_places(client: redis.Redis, queue: str) -> dict[str, list[str]]:
    """shard -> where a message for it waits: `queue` (the list) or `unacked` (delivered, not acked)."""
    places: dict[str, list[str]] = {}
    for raw in client.lrange(queue, 0, -1):
        if shard := _message_shard(raw):
            places.setdefault(shard, []).append("queue")
    for raw in client.hvals("unacked"):
        if shard := _message_shard(raw):
            places.setdefault(shard, []).append("unacked")
    return places


def run_meta(client: redis.Redis, run: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(f"labeler:run:{run}:meta").items()}


def ledger_finished(meta: dict[str, str]) -> bool:
    images, done = int(meta.get("images", 0)), int(meta.get("done", 0))
    enqueuing = float(meta.get("enqueuing_until", 0)) > time.time()
    return images > 0 and done >= images and not enqueuing


# -- the dataset read back ---------------------------------------------------------------------------


@dataclass
class DatasetCheck:
    """The run's folder read back with pyarrow, as a user globs it (`labels/*.parquet`)."""

    images: int
    rows: int = 0
    distinct_paths: int = 0
    duplicates: int = 0
    missing: int = 0
    unexpected: int = 0  # rows whose path was not an input
    error_rows: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    stray_files: list[str] = field(default_factory=list)
    manifest_present: bool = False
    manifest_rows: int | None = None
    manifest_shards: int | None = None
    files: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def failures(self) -> list[str]:
        failed = []
        if self.rows != self.images:
            failed.append(f"{self.rows} rows for {self.images} images")
        if self.duplicates:
            failed.append(f"{self.duplicates} duplicate rows: {self.examples.get('duplicates')}")
        if self.missing:
            failed.append(f"{self.missing} images without a row: {self.examples.get('missing')}")
        if self.unexpected:
            failed.append(f"{self.unexpected} rows of paths that were not inputs")
        if self.error_rows:
            failed.append(f"{self.error_rows} error rows: {self.error_codes} {self.examples.get('errors')}")
        if self.stray_files:
            failed.append(f"stray files: {self.stray_files[:10]}")
        if not self.manifest_present:
            failed.append("no manifest.json")
        elif self.manifest_rows != self.images:
            failed.append(f"manifest.json counts {self.manifest_rows} rows for {self.images} images")
        return failed


def check_dataset(output: Path, paths: list[str], done_shards: Iterable[str] | None = None) -> DatasetCheck:
    """Read OUTPUT/labels/*.parquet back and list what does not belong in OUTPUT: files that are
    neither the manifest, the stored shard list nor a shard file the manifest lists (temporary
    files a killed writer left, a shard file outside the run). Without a manifest the shard files
    are held against `done_shards` (the ledger's) instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check = DatasetCheck(images=len(set(paths)))
    labels = output / "labels"
    files = sorted(labels.glob("*.parquet")) if labels.is_dir() else []
    check.files = len(files)
    tables = [pq.read_table(file, columns=["path", "error_code"]) for file in files]
    table = pa.concat_tables(tables) if tables else pa.table({"path": [], "error_code": []})
    rows = table.column("path").to_pylist()
    codes = table.column("error_code").to_pylist()
    check.rows = len(rows)
    seen: dict[str, int] = {}
    for path in rows:
        seen[path] = seen.get(path, 0) + 1
    check.distinct_paths = len(seen)
    check.duplicates = check.rows - check.distinct_paths
    wanted = set(paths)
    missing = sorted(wanted - set(seen))
    check.missing = len(missing)
    check.unexpected = len(set(seen) - wanted)
    for code in codes:
        if code is not None:
            check.error_rows += 1
            check.error_codes[code] = check.error_codes.get(code, 0) + 1
    check.examples = {
        "duplicates": sorted(path for path, n in seen.items() if n > 1)[:5],
        "missing": missing[:5],
        "errors": [path for path, code in zip(rows, codes, strict=True) if code is not None][:5],
    }
    manifest_file = output / "manifest.json"
    listed: set[str] | None = None
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        check.manifest_present = True
        check.manifest_rows = manifest["counts"]["rows"]
        check.manifest_shards = manifest["counts"]["shards"]
        listed = {shard["file"] for shard in manifest["shards"]}
    elif done_shards is not None:
        listed = {f"labels/part-{shard}.parquet" for shard in done_shards}
    check.stray_files = _strays(output, listed)
    return check


def _strays(output: Path, listed: set[str] | None) -> list[str]:
    strays = []
    for item in sorted(output.rglob("*")):
        name = item.relative_to(output).as_posix()
        if item.is_dir() and name in ("labels", "shards"):
            continue
        if name == "manifest.json" or re.fullmatch(r"shards/(index|[0-9]{6,}(\.[01])*)\.json", name):
            continue
        if re.fullmatch(r"labels/part-[0-9]{6,}(\.[01])*\.parquet", name) and (
            listed is None or name in listed
        ):
            continue
        strays.append(name)
    return strays


# -- the soak ------------------------------------------------------------------------------------------


@dataclass
class SoakReport:
    """Figures of one soak and every invariant it broke."""

    run: str
    images: int
    workers: int
    faults_planned: int = 0
    worker_kills: int = 0
    redis_kills: int = 0
    redis_losses: int = 0
    redis_down_s: float = 0.0
    forgotten: list[dict[str, Any]] = field(default_factory=list)  # per write loss: what the ledger lost
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    last_fault_s: float | None = None  # after the enqueue
    finished_s: float | None = None  # ledger finished, after the enqueue
    manifest_s: float | None = None
    after_last_fault_s: float | None = None  # finished - last fault
    left_after_last_fault: int | None = None  # images the ledger had not done once the last fault was over
    total_s: float = 0.0
    hung: bool = False
    finished_inside_window: bool = False
    ledger: dict[str, int] = field(default_factory=dict)
    dataset: DatasetCheck | None = None
    hang_evidence: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)

    @property
    def redis_crashes(self) -> int:
        return self.redis_kills + self.redis_losses

    def failures(self) -> list[str]:
        failed = []
        if self.hung:
            failed.append(f"the run did not finish (hang): {json.dumps(self.hang_evidence)[:5000]}")
        if self.dataset is not None:
            failed += self.dataset.failures()
        counts = self.ledger
        if counts and not (
            counts["images"] == counts["done"] == self.images and counts["shards"] == counts["shards_done"]
        ):
            failed.append(f"ledger counts disagree with the inputs: {counts}")
        if counts and self.dataset is not None and counts.get("failed") != self.dataset.error_rows:
            failed.append(
                f"ledger counts {counts.get('failed')} failed images, the dataset {self.dataset.error_rows}"
            )
        return failed

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["redis_crashes"] = self.redis_crashes
        out["failures"] = self.failures()
        return out

    def summary(self) -> str:
        d = self.dataset
        lines = [
            f"run {self.run}: {self.images} images, {self.workers} workers; faults: {self.worker_kills} worker "
            f"SIGKILLs, {self.redis_crashes} Redis SIGKILLs ({self.redis_losses} losing their last writes, "
            f"Redis down {self.redis_down_s:.1f} s in all)",
        ]
        if self.finished_s is not None:
            lines.append(f"finished {self.finished_s:.1f} s after the enqueue, {self.after_last_fault_s:.1f} s "
                         f"after the last fault (at {self.last_fault_s or 0:.1f} s, {self.left_after_last_fault} "
                         f"images left then); total {self.total_s:.1f} s")  # fmt: skip
        if d is not None:
            lines.append(f"dataset: {d.rows} rows, {d.distinct_paths} distinct paths, {d.duplicates} duplicates, "
                         f"{d.missing} missing, {d.error_rows} error rows, {len(d.stray_files)} stray files, "
                         f"manifest {'present' if d.manifest_present else 'ABSENT'} ({d.manifest_rows} rows), "
                         f"{d.files} shard files")  # fmt: skip
        for loss in self.forgotten:
            lines.append(f"write loss at {loss['at_s']:.1f} s: {loss['window_s']:.1f} s of writes lost; the ledger "
                         f"forgot {len(loss['done_forgotten'])} done shards ({', '.join(loss['done_forgotten'])}), "
                         f"{len(loss['claims_forgotten'])} claims ({', '.join(loss['claims_forgotten'])}); taken by a "
                         f"worker, not yet claimed at the copy: {loss['delivered_unclaimed_at_copy'] or 'none'}")  # fmt: skip
        lines.append(f"worker logs: {self.logs.get('counts')}")
        failed = self.failures()
        lines.append("invariants: all held" if not failed else "INVARIANTS FAILED:\n  " + "\n  ".join(failed))
        return "\n".join(lines)


class ChaosSoak:
    """Run one chaos soak: `enqueue()` publishes the run; faults follow `plan`; then the checks."""

    def __init__(self, server: RedisServer, fleet: Fleet, plan: ChaosPlan, run: str, output: Path,
                 paths: list[str], queue: str, scratch: Path, echo: Callable[[str], None] = print) -> None:  # fmt: skip
        self.server = server
        self.fleet = fleet
        self.plan = plan
        self.run = run
        self.output = output
        self.paths = paths
        self.queue = queue
        self.scratch = scratch
        self.echo = echo
        self.rng = random.Random(plan.seed + 1)
        self.report = SoakReport(run=run, images=len(set(paths)), workers=plan.workers)
        self._client: redis.Redis | None = None
        self.t0 = time.monotonic()

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.server.url, socket_timeout=3, socket_connect_timeout=2)
        return self._client

    def soak(self, enqueue: Callable[[], object]) -> SoakReport:
        report = self.report
        faults = self.plan.schedule()
        report.faults_planned = len(faults)
        self.fleet.start()
        enqueue()
        self.t0 = time.monotonic()
        restarts: list[tuple[float, int]] = []  # (due, slot)
        try:
            self._follow(faults, restarts)
        finally:
            report.total_s = round(time.monotonic() - self.t0, 2)
            self.fleet.stop()
        self._check()
        return report

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _follow(self, faults: list[Fault], restarts: list[tuple[float, int]]) -> None:
        report, plan = self.report, self.plan
        pending = list(faults)
        last_poll = -1.0
        while True:
            now = self.now()
            for due, slot in [r for r in restarts if r[0] <= now]:
                restarts.remove((due, slot))
                worker = self.fleet.spawn(slot)
                self._note("restart", worker.name)
            if pending and pending[0].at_s <= now and report.finished_s is None:
                fault = pending.pop(0)
                if not self._fire(fault, restarts):  # no worker ready to kill yet: a second later
                    pending = sorted([*pending, Fault(now + 1.0, fault.kind)], key=lambda f: f.at_s)
            if now - last_poll >= 0.25:
                last_poll = now
                try:
                    meta = run_meta(self.client, self.run)
                except redis.exceptions.RedisError:
                    meta = {}
                if report.finished_s is None and ledger_finished(meta):
                    report.finished_s = round(now, 2)
                    report.finished_inside_window = bool(pending)
                    self.echo(f"  {now:6.1f} s  the ledger says finished ({meta.get('done')} images)")
                if report.finished_s is not None and (self.output / "manifest.json").exists():
                    report.manifest_s = round(now, 2)
                    break
                if report.finished_s is not None and now - report.finished_s > plan.manifest_grace_s:
                    break  # no manifest: check_dataset says so
            if now > plan.timeout_s:
                report.hung = True
                self.echo(f"  {now:6.1f} s  HANG: the run is not finished after {plan.timeout_s:.0f} s")
                self._hang_evidence()
                break
            time.sleep(0.05)
        if report.finished_s is not None and report.last_fault_s is not None:
            report.after_last_fault_s = round(report.finished_s - report.last_fault_s, 2)
        elif report.finished_s is not None:
            report.after_last_fault_s = report.finished_s

    def _note(self, what: str, detail: str, **extra: Any) -> None:
        entry = {"at_s": round(self.now(), 2), "what": what, "detail": detail, **extra}
        self.report.fault_log.append(entry)
        self.echo(f"  {entry['at_s']:6.1f} s  {what} {detail}")

    def _fire(self, fault: Fault, restarts: list[tuple[float, int]]) -> bool:
        fired = self._break(fault, restarts)
        if fired:
            try:
                meta = run_meta(self.client, self.run)
                self.report.left_after_last_fault = int(meta.get("images", 0)) - int(meta.get("done", 0))
            except redis.exceptions.RedisError:
                self.report.left_after_last_fault = None
        return fired

    def _break(self, fault: Fault, restarts: list[tuple[float, int]]) -> bool:
        report = self.report
        if fault.kind == WORKER:
            ready = self.fleet.ready_slots()
            if not ready:
                return False
            slot = self.rng.choice(ready)
            report.last_fault_s = round(self.now(), 2)
            name = self.fleet.kill(slot)
            report.worker_kills += 1
            self._note("SIGKILL worker", name)
            restarts.append((self.now() + self.rng.uniform(*self.plan.restart_delay_s), slot))
        elif fault.kind == REDIS_KILL:
            report.last_fault_s = round(self.now(), 2)
            crash_redis(self.server)
            report.redis_kills += 1
            self._note("SIGKILL redis-server", f"port {self.server.port}")
            self._restart_redis()
        else:
            self._lose_writes()
        return True

    def _restart_redis(self) -> None:
        down = self.rng.uniform(*self.plan.redis_down_s)
        time.sleep(down)
        started = time.monotonic()
        self.server.start()
        self.report.redis_down_s = round(self.report.redis_down_s + down + time.monotonic() - started, 2)
        self._note("redis-server back", f"same port and data folder, down {down:.1f} s + load")

    def _lose_writes(self) -> None:
        """Copy the AOF at the plan's `loss_moment`, let the run go on until a shard has finished
        since (at least `lose_window_s`, and until the shards a worker had taken but not claimed
        at the copy are claimed), then SIGKILL Redis and restart it from the copy."""
        copy = self.scratch / f"aof-copy-{self.report.redis_losses}"
        unclaimed = delivered_unclaimed(self.run, self.queue)
        moments = {"any": None, "at-delivery": unclaimed, "between-deliveries": lambda c: not unclaimed(c)}
        taken = snapshot_aof(self.server, copy, moments[self.plan.loss_moment])
        found = taken is not None
        if taken is None:  # no such instant came: lose an ordinary second instead
            self.echo(f"          no instant {self.plan.loss_moment} came; copying the AOF as it is")
            taken = snapshot_aof(self.server, copy)
        caught = taken if isinstance(taken, list) else []
        copied_at = time.monotonic()
        done_then = {s for s, v in shard_picture(self.client, self.run).items() if v["s"] == "done"}
        deadline = copied_at + self.plan.lose_window_s + 15
        while True:
            time.sleep(0.05)
            before = shard_picture(self.client, self.run)
            done_now = {s for s, v in before.items() if v["s"] == "done"}
            claimed = all(before.get(s, {}).get("s") != "queued" for s in caught)
            waited = time.monotonic() - copied_at
            if waited >= self.plan.lose_window_s and done_now - done_then and claimed:
                break
            if time.monotonic() > deadline:
                break
        self.report.last_fault_s = round(self.now(), 2)
        crash_redis(self.server)
        restore_aof(self.server, copy)
        self.report.redis_losses += 1
        self._note("SIGKILL redis-server, AOF put back as it was", f"{waited:.1f} s earlier")
        self._restart_redis()
        after = shard_picture(self.client, self.run)
        forgotten_done = sorted(
            s for s, v in before.items() if v["s"] == "done" and after.get(s, {}).get("s") != "done"
        )
        forgotten_claims = sorted(s for s, v in before.items()
                                  if v["s"] == "running" and after.get(s, {}).get("o") != v.get("o"))  # fmt: skip
        loss = {"at_s": self.report.last_fault_s, "window_s": round(waited, 2), "done_forgotten": forgotten_done,
                "claims_forgotten": forgotten_claims, "delivered_unclaimed_at_copy": caught,
                "moment": self.plan.loss_moment, "moment_found": found,
                "states_after": {s: after.get(s, {}).get("s", "absent") for s in forgotten_done + forgotten_claims}}  # fmt: skip
        self.report.forgotten.append(loss)
        self.echo(f"          the ledger forgot done: {forgotten_done}, claims: {forgotten_claims}; "
                  f"taken, not yet claimed at the copy: {caught}")  # fmt: skip

    def _hang_evidence(self) -> None:
        evidence: dict[str, Any] = {}
        try:
            picture = shard_picture(self.client, self.run)
            places = message_places(self.client, self.queue)
            now = time.time()
            stuck = {}
            for shard, state in sorted(picture.items()):
                if state["s"] in ("done", "split"):
                    continue
                stuck[shard] = {"state": state["s"], "owner": state.get("o"), "attempts": state.get("a"),
                                "lease_left_s": round(float(state["u"]) - now, 1) if state.get("u") else None,
                                "messages": places.get(shard, [])}  # fmt: skip
            evidence = {"meta": run_meta(self.client, self.run), "stuck_shards": stuck,
                        "queue_length": self.client.llen(self.queue), "unacked": self.client.hlen("unacked"),
                        "leases": self.client.zcard("labeler:leases"),
                        "log_lines": self.fleet.grep(stuck)}  # fmt: skip
        except redis.exceptions.RedisError as exc:
            evidence = {"redis_error": repr(exc)}
        self.report.hang_evidence = evidence

    def _check(self) -> None:
        report = self.report
        try:
            meta = run_meta(self.client, self.run)
            picture = shard_picture(self.client, self.run)
        except redis.exceptions.RedisError:
            meta, picture = {}, {}
        keys = ("images", "done", "failed", "shards", "shards_done")
        report.ledger = {key: int(meta.get(key, 0)) for key in keys}
        done = [shard for shard, state in picture.items() if state["s"] == "done"]
        report.dataset = check_dataset(self.output, self.paths, done_shards=done)
        report.logs = self.fleet.log_summary()


# -- inputs ---------------------------------------------------------------------------------------------


def small_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """`count` distinct 64x64 JPEGs cut from scikit-image's photographs (the tests' crops)."""
    import cv2
    import numpy as np
    import skimage.data as data

    photos = {name: np.ascontiguousarray(getattr(data, name)()[..., :3])
              for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, crop in enumerate(small_crops(photos, count, seed)):
        path = folder / f"img{i:05d}.jpg"
        cv2.imwrite(str(path), crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
        paths.append(str(path))
    return paths


def enqueue_with_cli(env: dict[str, str], run: str, paths: list[str], output: Path, shard_size: int,
                     list_file: Path) -> str:  # fmt: skip
    """`labeler enqueue @LIST --run RUN --output OUTPUT --shard-size N` as a user runs it; its stderr."""
    list_file.write_text("".join(f"{path}\n" for path in paths))
    argv = [sys.executable, "-m", "worker", "enqueue", f"@{list_file}", "--run", run, "--output", str(output),
            "--shard-size", str(shard_size), "--no-progress"]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"labeler enqueue failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stderr.strip()


# Worker settings of a soak: production delivery settings (Celery's visibility timeout of an hour,
# three attempts), so recovery rests on the ledger's leases alone, with short leases, heartbeat
# and sweep; the engine slowed by the tests' stand-in (slow_gpu.py) so a small run lasts long
# enough to be broken, with little CPU. The reconciler looks for orphans every 2 s and republishes
# a queued shard without a message after 5 s (production: 30 s and 60 s).
SOAK_SETTINGS: dict[str, object] = {
    "lease_s": 4, "heartbeat_s": 1, "sweep_interval_s": 1, "reconcile_interval_s": 2, "orphan_after_s": 5,
    "visibility_timeout_s": 3600, "task_deadline_s": 1800,
    "deadline_grace_s": 15, "restore_interval_s": 10, "restore_throttle": 10, "max_attempts": 3,
    "redis_retry_s": 60, "concurrency": 2, "batch_size": 4, "test_batch_sleep_s": 1.0,
}  # fmt: skip


def run_soak(folder: Path, bundle: Path, plan: ChaosPlan, images: int, shard_size: int,
             settings: dict[str, object] | None = None, use_cli: bool = True,
             echo: Callable[[str], None] = print) -> SoakReport:  # fmt: skip
    """One whole soak in `folder`: a private redis-server (AOF everysec), `plan.workers` real
    workers, `images` small JPEGs enqueued as one run in shards of `shard_size`, `plan`'s faults."""
    from distributed_helpers import QUEUE, worker_env

    paths = small_jpegs(folder / "images", images, seed=plan.seed)
    server = RedisServer(folder / "redis").start()
    output_root = folder / "runs"
    run = f"chaos-{plan.seed}"
    output = output_root / run
    env = worker_env(server.url, bundle, **{"output_roots": output_root, **SOAK_SETTINGS, **(settings or {})})
    fleet = Fleet(plan.workers, env, folder / "logs", ["--include", "slow_gpu"])
    soak = ChaosSoak(server, fleet, plan, run, output, paths, QUEUE, folder / "scratch", echo)

    def enqueue() -> None:
        if use_cli:
            echo(
                "  "
                + enqueue_with_cli(env, run, paths, output, shard_size, folder / "inputs.txt").replace(
                    "\n", "\n  "
                )
            )
        else:
            from worker.client.enqueue import enqueue_run

            summary = enqueue_run(server.client(), run, paths, str(output), QUEUE, shard_size)
            echo(f"  enqueued {summary.seen} images in {summary.shards} shards")

    echo(f"faults planned: {[(f.at_s, f.kind) for f in plan.schedule()]}")
    try:
        return soak.soak(enqueue)
    finally:
        fleet.stop()
        server.stop()
