"""A network partition: Redis and two workers on test hosts of their own, one worker cut off from
Redis mid-shard and healed after its lease lapsed and the other worker relabeled its shard.

Topology, made by the test (you are root) with fresh names and a free 10.x.y.0/24 per run:

    root namespace (pytest: enqueues, reads the ledger)  .1 --veth--+
    ns "redis": redis-server (password, AOF) on .2:6379      --veth--+-- bridge br0 in ns "sw"
    ns "cut":   worker `cut` (slowed, tests/distributed/slow_gpu.py) --veth--+
    ns "peer":  worker `peer`                                 --veth--+

The cut is `ip link set p-cut down` on the cut worker's veth, at the switch's end: its link loses
carrier and everything it sends is dropped (no reset: its open Redis connections just hang, new
ones time out), while Redis and the peer see nothing, as when a node's cable or switch port fails.

Timeline (leases of 6 s renewed every 2 s, a sweep every 1 s):
1. `cut` takes one shard, labels two batches of it and stalls (the stand-in engine's hold); `peer`
   labels the other five shards.
2. Cut. `cut` cannot renew; its lease lapses, `peer`'s sweeper requeues the shard, `peer` labels it.
3. `cut` resumes (the hold is lifted) and finishes labeling its shard while still cut off.
4. Heal, once that is done. `cut`'s late job must find its lease lost and change nothing: no row,
   no file, no count. The cut lasts under two leases (~10 s): that is what proves the point (the
   lease lapsed, the shard was relabeled, and the cut worker finished its own labeling while cut
   off); the issue's minute goes with the default 30 s lease and would only add waiting.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis
from distributed_helpers import (
    PASSWORD,
    CeleryWorker,
    RedisServer,
    assert_exactly_once,
    enqueue,
    run_counts,
    run_output,
    wait_for,
    worker_env,
)

from worker.dataset.files import labels_dir, shard_files, shard_path
from worker.ledger.ledger import RunLedger, ShardState

pytestmark = pytest.mark.slow

LEASE_S, HEARTBEAT_S, SWEEP_S = 6, 2, 1
IMAGES, SHARD_SIZE, BATCH = 300, 50, 8
HELD_AFTER = 2  # batches the cut worker labels of its shard before it stalls


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no address or route of the root namespace overlaps."""
    used = []
    for line in ip("-4", "route", "show").splitlines() + ip("-4", "-o", "addr", "show").split("\n"):
        for word in line.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    for _ in range(100):
        subnet = ipaddress.ip_network(f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24")
        if not any(subnet.overlaps(other) for other in used if other.version == 4):
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 for the test network")


class HostNetwork:
    """Network namespaces on one bridge, each a test host; `close()` removes all that was made,
    processes first."""

    def __init__(self, log_dir: Path) -> None:
        token = secrets.token_hex(3)
        self.prefix = f"lbl-{token}"
        self.switch = f"{self.prefix}-sw"
        self.root_link = f"lbl{token}"  # the root namespace's veth: a unique name there
        self.subnet = free_subnet()
        self.addresses = iter(self.subnet.hosts())
        self.hosts: dict[str, str] = {}  # role -> address
        self.log_dir = log_dir
        self.made: list[str] = []
        self.processes: list[RedisServer | CeleryWorker] = []

    def namespace(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _plug(self, port: str) -> None:
        ip("-n", self.switch, "link", "set", port, "master", "br0")
        ip("-n", self.switch, "link", "set", port, "up")

    def build(self, roles: list[str]) -> HostNetwork:
        try:
            self._add_namespace(self.switch)
        except RuntimeError as exc:
            pytest.skip(f"network namespaces do not work on this machine: {exc}")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        prefix = self.subnet.prefixlen
        ip("link", "add", self.root_link, "type", "veth", "peer", "name", "p-root", "netns", self.switch)
        self._plug("p-root")
        ip("addr", "add", f"{next(self.addresses)}/{prefix}", "dev", self.root_link)
        ip("link", "set", self.root_link, "up")
        for role in roles:
            ns = self.namespace(role)
            self._add_namespace(ns)
            ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p-{role}", "netns", self.switch)
            self._plug(f"p-{role}")
            self.hosts[role] = str(next(self.addresses))
            ip("-n", ns, "addr", "add", f"{self.hosts[role]}/{prefix}", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        return self

    def cut(self, role: str) -> None:
        ip("-n", self.switch, "link", "set", f"p-{role}", "down")

    def heal(self, role: str) -> None:
        ip("-n", self.switch, "link", "set", f"p-{role}", "up")

    def start_redis(self, data_dir: Path) -> NamespacedRedis:
        data_dir.mkdir(parents=True, exist_ok=True)
        server = NamespacedRedis(data_dir, self.namespace("redis"), self.hosts["redis"])
        self.processes.append(server)
        return server.start()

    def worker(self, role: str, env: dict[str, str], extra: list[str] | None = None) -> CeleryWorker:
        argv = ["ip", "netns", "exec", self.namespace(role), sys.executable, "-m", "worker", "worker",
                "-n", f"{role}@%h", "-l", "INFO", *(extra or [])]  # fmt: skip
        worker = CeleryWorker(role, env, self.log_dir, argv)
        self.processes.append(worker)
        return worker

    def close(self) -> None:
        for process in reversed(self.processes):
            if isinstance(process, CeleryWorker):
                process.kill()
            else:
                process.stop()
        for ns in reversed(self.made):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:  # only processes of this test's own namespaces
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.root_link], capture_output=True)


class NamespacedRedis(RedisServer):
    """The helpers' redis-server (password, AOF), run in its own namespace on its veth address."""

    def __init__(self, data_dir: Path, netns: str, host: str) -> None:
        super().__init__(data_dir)
        self.netns, self.host, self.port = netns, host, 6379

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=5)

    def server_args(self) -> list[str]:
        args = super().server_args()
        args[args.index("--bind") + 1] = self.host
        return ["ip", "netns", "exec", self.netns, *args]


@pytest.fixture
def hosts(tmp_path) -> Iterator[HostNetwork]:
    if os.geteuid() != 0:
        pytest.skip("making network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`)")
    made = HostNetwork(tmp_path / "logs")
    try:
        yield made.build(["redis", "cut", "peer"])
    finally:
        made.close()


JOB_END = re.compile(r"Task labeler\.label_shard\S* (succeeded|raised|reject|retry).*")


def labeled_images(log: str) -> int:
    return sum(int(n) for n in re.findall(r"test stand-in engine: batch \d+ \((\d+) images\) labeled", log))


def test_a_worker_cut_off_mid_shard_loses_its_lease_and_its_late_job_changes_nothing(
    hosts, tiny_bundle, small_jpegs, tmp_path
) -> None:
    run, paths = "partition", small_jpegs[:IMAGES]
    server = hosts.start_redis(tmp_path / "redis")
    client = server.client()
    ledger = RunLedger(client)
    hold = tmp_path / "hold-cut-worker"
    hold.touch()
    settings = {"lease_s": LEASE_S, "heartbeat_s": HEARTBEAT_S, "sweep_interval_s": SWEEP_S, "concurrency": 1,
                "batch_size": BATCH, "task_deadline_s": 120, "visibility_timeout_s": 300}  # fmt: skip
    cut = hosts.worker("cut", worker_env(server.url, tiny_bundle, **settings, test_batch_sleep_s=0.25,
                                         test_hold_after=HELD_AFTER, test_hold_file=hold), ["--include", "slow_gpu"])  # fmt: skip
    peer = hosts.worker("peer", worker_env(server.url, tiny_bundle, **settings))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda worker: worker.start(ready_timeout=90), [cut, peer]))
    print(f"network {hosts.subnet} ({hosts.hosts}), logs in {hosts.log_dir}")

    def wait(condition: Callable[[], object], timeout: float, what: str) -> object:
        try:
            return wait_for(condition, timeout, what, interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- cut:\n{cut.log()[-4000:]}\n--- peer:\n{peer.log()[-4000:]}") from None

    def held_by_cut() -> ShardState | None:
        mine = [s for s in ledger.shard_states(run) if s.state == "running" and (s.owner or "").startswith("cut@")]
        return mine[0] if mine and f"batch {HELD_AFTER + 1} held" in cut.log() else None

    assert enqueue(client, run, paths, SHARD_SIZE).shards == IMAGES // SHARD_SIZE
    start = time.monotonic()
    timeline: dict[str, float] = {}

    # 1. `cut` holds one shard mid-way (two batches labeled, the rest to come).
    held: ShardState = wait(held_by_cut, 60, "the cut worker to stall mid-shard")  # type: ignore[assignment]
    shard = held.shard_id
    assert 0 < labeled_images(cut.log()) <= HELD_AFTER * BATCH  # the first batch may be short
    held_at = time.monotonic()
    wait(lambda: run_counts(client, run)["shards_done"] == IMAGES // SHARD_SIZE - 1, 60, "the peer to do the rest")
    # A slow but living worker keeps its shard past the lease: the heartbeat renews it.
    time.sleep(max(0.0, held_at + LEASE_S + 2 * SWEEP_S - time.monotonic()))
    still = ledger.shard_state(run, shard)
    assert (still.state, still.owner, still.attempts) == ("running", held.owner, 1)
    assert "could not renew" not in cut.log()

    # 2. The cut: `cut` can no longer renew, so its lease runs out at the expiry Redis holds now,
    #    and the peer's sweeper (not Celery's redelivery: visibility 300 s) gives the shard back.
    hosts.cut("cut")
    timeline["cut"] = time.monotonic() - start
    lease_until = ledger.shard_state(run, shard).lease_until
    wait(lambda: ledger.shard_state(run, shard).owner != held.owner, LEASE_S + 15, "the cut worker's lease to lapse")
    timeline["lapsed"] = time.monotonic() - start
    assert time.time() >= lease_until, "the shard left its worker before the lease ran out"
    wait(lambda: ledger.shard_state(run, shard).state == "done", 30, "the peer to label the cut worker's shard")
    timeline["relabeled"] = time.monotonic() - start
    assert f"shard {shard} lost its worker; queued again" in peer.log()  # the peer's sweeper, not Celery
    file = shard_path(run_output(run), shard)
    written = file.stat()
    assert {w.split("@")[0] for w in pq.read_table(file, columns=["worker"]).column("worker").to_pylist()} == {"peer"}
    counts = run_counts(client, run)
    assert counts == {"images": IMAGES, "done": IMAGES, "failed": 0, "shards": 6, "shards_done": 6}

    # 3. `cut` goes on with its shard while still cut off, to the end of its labeling.
    hold.unlink()
    wait(lambda: labeled_images(cut.log()) >= SHARD_SIZE, 30, "the cut worker to finish labeling its shard")
    timeline["cut worker labeled its shard"] = time.monotonic() - start
    assert labeled_images(cut.log()) == SHARD_SIZE
    time.sleep(2)  # what writing a shard's file takes, many times over

    # 4. Heal: the late job finds its lease lost and ends without a write or a count.
    hosts.heal("cut")
    timeline["healed"] = time.monotonic() - start
    ended = wait(lambda: JOB_END.search(cut.log()), 45, "the healed worker's job to end")
    timeline["late job ended"] = time.monotonic() - start
    print("timeline (s):", {k: round(v, 1) for k, v in timeline.items()})

    log = cut.log()
    assert "'skipped': 'lost'" in ended[0], f"the cut worker's late job did not find its lease lost: {ended[0]}"
    assert f"run {run} shard {shard}: lease lost meanwhile" in log
    assert "finished by another worker too" not in log
    after = file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (written.st_ino, written.st_mtime_ns), "the cut worker rewrote the file"
    assert not list(labels_dir(run_output(run)).glob(".part-*")), "a temporary file was left"
    assert list(shard_files(run_output(run))) == [f"{i:06d}" for i in range(6)]
    state = ledger.shard_state(run, shard)
    assert (state.state, state.attempts, state.labeled, state.failed, state.owner) == ("done", 2, SHARD_SIZE, 0, None)
    assert run_counts(client, run) == counts
    # The ledger's own fence: a finish with the cut worker's token is refused and moves nothing.
    assert not ledger.finish(run, shard, held.owner, SHARD_SIZE, 0)
    assert run_counts(client, run) == counts
    assert client.llen(f"labeler:run:{run}:dead") == 0
    assert_exactly_once(client, run, paths)
    assert cut.alive() and peer.alive()
