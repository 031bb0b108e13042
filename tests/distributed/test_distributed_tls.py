"""TLS through the URL alone: a redis-server that speaks only TLS (certificate from a test CA),
a real worker and the client configured with `rediss://...?ssl_cert_reqs=required&ssl_ca_certs=...`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from distributed_helpers import PASSWORD, RedisServer, enqueue, wait_run_done

pytestmark = pytest.mark.slow


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "1", "-subj", "/CN=labeler-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")  # fmt: skip
    (folder / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "1", "-extfile", "san.cnf")  # fmt: skip
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


class TlsRedisServer(RedisServer):
    """The same private server, listening on a TLS port only."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.ca, self.cert, self.key = make_certificates(data_dir)

    @property
    def url(self) -> str:
        return f"rediss://:{PASSWORD}@localhost:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"

    def server_args(self) -> list[str]:
        args = super().server_args()
        args[args.index("--port") + 1] = "0"
        return args + ["--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                       "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca),
                       "--tls-auth-clients", "no"]  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path) -> Iterator[TlsRedisServer]:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode:
        pytest.skip("openssl is not installed")
    server = TlsRedisServer(tmp_path).start()
    yield server
    server.stop()


def test_rediss_url_with_verified_certificate(tls_redis, start_worker, small_jpegs) -> None:
    client = tls_redis.client()
    assert client.ping()
    # Verification is on: the same URL without our CA is refused, and plain TCP is not served.
    unverified = tls_redis.url.split("&ssl_ca_certs=")[0]
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(unverified).ping()
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(f"redis://:{PASSWORD}@localhost:{tls_redis.port}/0", socket_timeout=2).ping()

    worker = start_worker(tls_redis.url, "tls")
    enqueue(client, "over-tls", small_jpegs[:20], shard_size=10)
    counts = wait_run_done(client, "over-tls", 90)
    assert counts == {"images": 20, "done": 20, "failed": 0, "shards": 2, "shards_done": 2}
    assert "rediss://:**@localhost" in worker.log()  # the password stays out of the log
