"""`labeler run` throughput from a bucket against the same images on local disk.

    python bench/bench_object_storage.py [--model BUNDLE] [--images 300] [--repeats 3] [--latency-ms 0]

The images (ImageNet-size JPEGs, bench/common.py) are written to a folder and uploaded to a real
SeaweedFS S3 server on loopback (the object-storage tests' helper). Each repeat labels them three
ways, interleaved so machine noise hits all three: `local` (files), `bucket, old` (URLs read on the
decode threads: fetch concurrency 0, the behaviour before the fetch stage) and `bucket, fetch`
(the fetch stage, 32 reads at once). Each runs the real service as `labeler run` builds it
(build_service + run_local); the model load is not timed. Figures: median images/s per way, and
each bucket way as a ratio to local disk (target >= 0.8).

On one machine the store takes CPU from decoding and inference, so CPU seconds per image are also
given for this process and for the weed server; `if the store had its own CPU` estimates the ratio
for a CPU-bound run as local's CPU per image over this process's CPU per image from the bucket.
`--latency-ms N` puts the tests' SlowLink proxy (N ms per request, real sockets) in front of the
store: a store one network round trip away (the proxy's CPU is counted in this process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    bundle_or_default,
    machine_description,
    machine_load,
    make_photo_set,
    process_cpu,
    tiny_bundle,
)

sys.path.insert(0, str(REPO / "tests" / "objectstore"))
from objectstore_helpers import IMAGES_BUCKET, running_server, slow_link  # noqa: E402

from worker.dataset import storage  # noqa: E402
from worker.local.run import run_local  # noqa: E402
from worker.pipeline.build import ServiceConfig, build_service  # noqa: E402

WAYS = {"local": None, "bucket, old": 0, "bucket, fetch": 32}  # way -> fetch concurrency (None: files)


@dataclass
class Way:
    rates: list[float] = field(default_factory=list)  # images/s per repeat
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds per image
    store_cpu: list[float] = field(default_factory=list)  # the weed server's CPU seconds per image


def label_once(bundle: Path, inputs: list[str], fetch: int | None, batch: int, store_pid: int, out: Path) -> tuple:
    config = ServiceConfig(backend="onnxruntime", batch_size=batch, fetch_concurrency=fetch or 0)
    service = build_service(bundle, config)
    service.start()  # the model loads (and warms up) before the CPU clocks start, as run_local's timer does
    service.start = lambda: service  # run_local's `with service` must not start it twice
    cpu, store = process_cpu(), process_cpu(store_pid)
    summary = run_local(inputs, service, out)
    cpu, store = process_cpu() - cpu, process_cpu(store_pid) - store
    assert summary.labeled == len(inputs), summary.lines()
    return len(inputs) / summary.seconds, cpu / len(inputs), store / len(inputs)


def bench_model(name: str, bundle: Path, files: list[Path], urls: list[str], args, store_pid: int, tmp: Path) -> None:
    ways = {way: Way() for way in WAYS}
    for repeat in range(args.repeats):
        for way, fetch in WAYS.items():
            inputs = [str(p) for p in files] if fetch is None else urls
            rate, cpu, store = label_once(bundle, inputs, fetch, args.batch_size, store_pid, tmp / "out.jsonl")
            ways[way].rates.append(rate)
            ways[way].cpu.append(cpu)
            ways[way].store_cpu.append(store)
            print(f"  {name} repeat {repeat + 1}: {way}: {rate:.1f} img/s", flush=True)
    local = statistics.median(ways["local"].rates)
    local_cpu = statistics.median(ways["local"].cpu)
    print(f"{name}: median of {args.repeats} interleaved repeats, {len(files)} images, batch {args.batch_size}")
    for way, result in ways.items():
        rate, cpu, store = (statistics.median(values) for values in (result.rates, result.cpu, result.store_cpu))
        line = f"  {way:14s} {rate:7.1f} img/s  ratio {rate / local:.2f}  CPU/img: labeler {cpu * 1e3:.1f} ms"
        if way != "local":
            line += f", store {store * 1e3:.1f} ms; if the store had its own CPU: ratio ~{local_cpu / cpu:.2f}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="bundle (default: the embedded default ResNet-50)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="a slow link in front of the store")
    parser.add_argument("--no-small", action="store_true", help="skip the small model (I/O matters more)")
    args = parser.parse_args()
    args.model = bundle_or_default(args.model)
    print(f"machine: {machine_description()}, {machine_load()}")
    with tempfile.TemporaryDirectory() as tmp_text, ExitStack() as stack:
        tmp = Path(tmp_text)
        files = make_photo_set(tmp / "photos", args.images)
        (tmp / "seaweedfs").mkdir()
        server = stack.enter_context(running_server(tmp / "seaweedfs"))
        admin = server.client()
        admin.pipe({f"{IMAGES_BUCKET}/bench/{p.name}": p.read_bytes() for p in files})
        os.environ.update(server.env())
        if args.latency_ms:
            link = stack.enter_context(slow_link(server.s3_port, args.latency_ms / 1000))
            os.environ[storage.S3_ENDPOINT_ENV] = link.endpoint
        storage.clear_cache()
        urls = [f"s3://{IMAGES_BUCKET}/bench/{p.name}" for p in files]
        size = sum(p.stat().st_size for p in files) / len(files)
        print(f"images: {len(files)} JPEGs, about 500x375, {size / 1024:.0f} KiB on average; store: SeaweedFS "
              f"on loopback{f' behind a {args.latency_ms:g} ms link' if args.latency_ms else ''}")  # fmt: skip
        models = [("ResNet-50", args.model)]
        if not args.no_small:
            models.append(("tiny ResNet-50 (1/8 width)", tiny_bundle(tmp)))
        for name, bundle in models:
            started = time.perf_counter()
            bench_model(name, bundle, files, urls, args, server.process.pid, tmp)
            print(f"  ({time.perf_counter() - started:.0f} s; {machine_load()})", flush=True)


if __name__ == "__main__":
    main()
