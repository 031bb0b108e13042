"""Container shards (issue 19): labeling throughput from WebDataset tars and Parquet files in a
bucket against loose files, the input CPU per image of each format, and enqueueing 10,000 tars.

    python bench/bench_formats.py [--images 500] [--repeats 3] [--per-tar 100] [--json OUT]

1. Throughput. The same JPEGs (ImageNet-size, bench/common.py) are labeled five ways, all
   interleaved in every repeat so machine noise hits each: (a) `local files` (the baseline),
   (b) `bucket objects` (one object per image in a real SeaweedFS S3 server on loopback, read by
   the fetch stage, 32 at once: today's path for loose URLs), (c) `bucket tars` (WebDataset
   shards written with the `webdataset` package's ShardWriter, `--per-tar` samples each, in the
   bucket, named in brace notation), (d) `bucket parquet` (img2dataset's layout: `key` and `jpg`
   binary columns beside url/caption/status, written with pyarrow in row groups of
   `--row-group` rows, `--per-tar` rows a file, found by listing the prefix) and (e) `local tars`
   (the same tar files on local disk, found by walking the folder). Inputs are expanded by
   iter_input_paths (untimed, as `labeler run` does before its clock starts) and labeled by the
   service `labeler run` builds (build_service + run_local, ONNX Runtime, model load not timed)
   with the small model: the tests' 1/8-width ResNet-50 with random weights (`--model` for
   another). Figures: median images/s, its ratio to (a), the labeler's CPU per image (this
   process, all threads) and the store's (the `weed server` process). Every run's records are
   checked: one per image, no error row, the same top label as (a) gave the same image.

2. Input CPU. What reading alone costs, without decoding: `iter_items` over each way's
   containers (every sample's bytes in hand), against `read_image_bytes` of each loose object or
   file (the call the fetch and decode threads make per image). CPU seconds of this process (all
   threads: the block read-ahead and the S3 client's event loop included) per image, the store's,
   and the reading's own rate in images/s (one reader, nothing else running).

3. Enqueue. `--enqueue-shards` (10,000) tars named in brace notation in a bucket
   (`s3://images/x/{00000..09999}.tar`: enqueue opens no tar, so they need not exist) and a local
   folder of as many tiny tar files (an empty archive each) walked as a directory, expanded by
   iter_input_paths and enqueued by enqueue_run (one shard per container, its list written to a
   local output folder) into a private redis-server (AOF everysec, as deploy configures it; the
   distributed tests' helper), no worker consuming: seconds from the first input to the last
   shard published; the expansion alone is timed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    RedisServer,
    cpu_name,
    machine_description,
    machine_load,
    make_photo_set,
    process_cpu,
    tiny_bundle,
)

sys.path.insert(0, str(REPO / "tests" / "objectstore"))
from objectstore_helpers import IMAGES_BUCKET, running_server  # noqa: E402

from worker.dataset import storage  # noqa: E402
from worker.dataset.shard_list import stored_root_shards  # noqa: E402
from worker.pipeline.inputs import iter_input_paths  # noqa: E402
from worker.pipeline.reading import ReadPolicy, read_image_bytes  # noqa: E402
from worker.sources.container import Container, ContainerOptions  # noqa: E402
from worker.sources.items import iter_items  # noqa: E402

MODES = ("local files", "bucket objects", "bucket tars", "bucket parquet", "local tars")
FETCH_CONCURRENCY = 32  # `labeler run`'s default
EMPTY_TAR = bytes(10240)  # what `tar cf x.tar -T /dev/null` writes: end blocks, one record


def load_one() -> float:
    return os.getloadavg()[0]


# -- the data: the same JPEGs loose, in tars and in Parquet files ------------------------------


def sample_key(index: int) -> str:
    """img2dataset's key: shard number (5 digits) and index in it (4), here one flat count."""
    return f"{index:09d}"


def write_tars(files: list[Path], folder: Path, per_tar: int) -> list[Path]:
    """WebDataset shards as the `webdataset` package writes them: `KEY.jpg` + `KEY.json` per sample."""
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_tar, verbose=0) as sink:
        for index, path in enumerate(files):
            sink.write({"__key__": sample_key(index), "jpg": path.read_bytes(),
                        "json": {"url": f"https://example.com/{path.name}", "caption": path.stem}})  # fmt: skip
    return sorted(folder.glob("*.tar"))


def write_parquets(files: list[Path], folder: Path, per_file: int, row_group: int) -> list[Path]:
    """img2dataset's `output_format=parquet`: key, jpg (binary), url, caption, status, size columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    written = []
    for number, first in enumerate(range(0, len(files), per_file)):
        chunk = files[first : first + per_file]
        images = [p.read_bytes() for p in chunk]
        table = pa.table({
            "key": [sample_key(first + i) for i in range(len(chunk))],
            "jpg": pa.array(images, pa.binary()),
            "url": [f"https://example.com/{p.name}" for p in chunk],
            "caption": [p.stem for p in chunk],
            "status": ["success"] * len(chunk),
            "original_width": pa.array([500] * len(chunk), pa.int32()),
            "original_height": pa.array([375] * len(chunk), pa.int32()),
        })  # fmt: skip
        path = folder / f"{number:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        written.append(path)
    return written


def expand(spec: str) -> list:
    return list(iter_input_paths([spec], formats=ContainerOptions()))


# -- 1. throughput ------------------------------------------------------------------------------


def top_labels(out: Path) -> dict[str, str]:
    """Each record's row path -> its top label (errors: "error:CODE")."""
    found = {}
    with open(out, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            error = record.get("error")
            found[record["path"]] = f"error:{error['code']}" if error else record["labels"][0]["label"]
    return found


def image_of(path: str) -> str:
    """The image a row path names: a loose file's name, a container sample's key's file name."""
    if "#" in path:
        return f"photo{int(path.rsplit('#', 1)[1]):05d}.jpg"
    return path.rsplit("/", 1)[1]


def label_once(
    bundle: Path, entries: list, batch: int, store_pid: int, out: Path
) -> tuple[float, float, float, dict, float]:
    from worker.local.run import run_local
    from worker.pipeline.build import ServiceConfig, build_service

    config = ServiceConfig(backend="onnxruntime", batch_size=batch, fetch_concurrency=FETCH_CONCURRENCY)
    service = build_service(bundle, config)
    service.start()  # the model loads (and warms up) before the CPU clocks start, as run_local's timer does
    service.start = lambda: service  # run_local's `with service` must not start it twice
    cpu, store = process_cpu(), process_cpu(store_pid)
    summary = run_local(entries, service, out)
    cpu, store = process_cpu() - cpu, process_cpu(store_pid) - store
    images = summary.labeled + sum(summary.errors.values())
    assert summary.complete and not summary.errors, summary.lines()
    labels = {image_of(path): label for path, label in top_labels(out).items()}
    assert len(labels) == images, f"{images} records name {len(labels)} images"
    return images / summary.seconds, cpu / images, store / images, labels, images / max(1, summary.batches)


def bench_throughput(bundle: Path, ways: dict[str, list], args, store_pid: int, tmp: Path) -> dict:
    """Every way once per repeat, the order rotated each repeat (so no way always follows another)."""
    rates, cpus, stores, ratios, fills = (defaultdict(list) for _ in range(5))
    loads: list[float] = []
    mismatches: dict[str, int] = defaultdict(int)
    for repeat in range(args.repeats):
        loads.append(load_one())
        order = MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]
        found: dict[str, dict[str, str]] = {}
        for mode in order:
            rate, cpu, store, labels, fill = label_once(
                bundle, ways[mode], args.batch_size, store_pid, tmp / "out.jsonl"
            )
            assert len(labels) == args.images, f"{mode}: {len(labels)} of {args.images} images labeled"
            found[mode] = labels
            rates[mode].append(rate)
            cpus[mode].append(cpu)
            stores[mode].append(store)
            fills[mode].append(fill)
            print(f"  repeat {repeat + 1}: {mode}: {rate:.1f} img/s, CPU/img {cpu * 1e3:.2f} + {store * 1e3:.2f} ms, "
                  f"{fill:.1f} images/batch",
                  flush=True)  # fmt: skip
        for mode in MODES:
            ratios[mode].append(rates[mode][-1] / rates[MODES[0]][-1])
            mismatches[mode] += sum(found[mode][name] != label for name, label in found[MODES[0]].items())
        loads.append(load_one())
    return {"rates": rates, "ratios": ratios, "cpu": cpus, "store_cpu": stores, "batch_fill": fills,
            "label_mismatches": mismatches, "load_1min": loads}  # fmt: skip


# -- 2. input CPU -------------------------------------------------------------------------------


def read_all(entries: list, policy: ReadPolicy) -> int:
    """Every image's bytes as the pipeline gets them, not decoded: loose paths through
    read_image_bytes (the fetch/decode threads' call), containers through iter_items."""
    count = 0
    for entry in entries:
        if isinstance(entry, Container):
            for item in iter_items(entry, policy):
                assert item.data and item.error is None, (item.path, item.error)
                count += 1
        else:
            assert read_image_bytes(entry, policy)
            count += 1
    return count


def bench_input(ways: dict[str, list], args, store_pid: int) -> dict:
    policy = ReadPolicy()
    cpus, stores, rates, loads = defaultdict(list), defaultdict(list), defaultdict(list), []
    for _ in range(args.repeats):
        loads.append(load_one())
        for mode, entries in ways.items():
            cpu, store, started = process_cpu(), process_cpu(store_pid), time.perf_counter()
            count = sum(read_all(entries, policy) for _ in range(args.input_passes))
            wall = time.perf_counter() - started
            cpu, store = process_cpu() - cpu, process_cpu(store_pid) - store
            assert count == args.images * args.input_passes, (mode, count)
            cpus[mode].append(cpu / count)
            stores[mode].append(store / count)
            rates[mode].append(count / wall)
        loads.append(load_one())
    return {"cpu": cpus, "store_cpu": stores, "rates": rates, "load_1min": loads}


# -- 3. enqueue ---------------------------------------------------------------------------------


class ShardListClock:
    """Time spent writing the run's shard list (pack files of container shards, each written
    durably: create, fsync, rename, fsync of the folder), by wrapping the one function that does."""

    def __init__(self) -> None:
        from worker.dataset import shard_list

        self.module, self.original, self.seconds = shard_list, shard_list._write_json, 0.0

    def __enter__(self) -> ShardListClock:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        self.module._write_json = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.module._write_json = self.original


def enqueue_once(server: RedisServer, spec: str, output: Path, count: int) -> dict[str, float]:
    """Seconds of iter_input_paths alone, of iter_input_paths + enqueue_run, and of the shard-list
    files within the latter, for one input spec into a fresh output folder and an empty Redis."""
    from worker.client.enqueue import enqueue_run

    started = time.perf_counter()
    expanded = sum(1 for _ in iter_input_paths([spec], formats=ContainerOptions()))
    listing = time.perf_counter() - started
    assert expanded == count, (spec, expanded)
    client = server.client()
    client.flushall()
    shutil.rmtree(output, ignore_errors=True)
    cpu = process_cpu()
    with ShardListClock() as files:
        started = time.perf_counter()
        entries = iter_input_paths([spec], formats=ContainerOptions())
        # No worker consumes the queue: the backpressure limit is raised above the run's shards.
        summary = enqueue_run(client, "bench", entries, str(output), "labeler", shard_size=5000,
                              max_queued_jobs=count + 1)  # fmt: skip
        seconds = time.perf_counter() - started
    cpu = process_cpu() - cpu
    assert summary.shards == count and summary.jobs == count and client.llen("labeler") == count, summary
    assert len(stored_root_shards(output)) == count
    return {"listing_s": listing, "enqueue_s": seconds, "shard_files_s": files.seconds, "cpu_s": cpu}


def bench_enqueue(args, tmp: Path) -> dict:
    count = args.enqueue_shards
    width = max(5, len(str(count - 1)))
    folder = tmp / "enqueue-tars"
    folder.mkdir()
    for index in range(count):
        (folder / f"{index:0{width}d}.tar").write_bytes(EMPTY_TAR)
    specs = {
        f"{count} brace-named tars in a bucket": f"s3://{IMAGES_BUCKET}/x/{{{0:0{width}d}..{count - 1:0{width}d}}}.tar",
        f"a local folder of {count} tars": str(folder),
    }
    results: dict = {name: defaultdict(list) for name in specs}
    loads = []
    parent = Path(tempfile.mkdtemp(dir=args.enqueue_dir)) if args.enqueue_dir else tmp
    output = parent / "enqueue-out"
    server = RedisServer(tmp / "redis").start()
    try:
        for repeat in range(args.enqueue_repeats):
            loads.append(load_one())
            for name, spec in specs.items():
                figures = enqueue_once(server, spec, output, count)
                for key, value in figures.items():
                    results[name][key].append(value)
                print(f"  repeat {repeat + 1}: {name}: expand {figures['listing_s']:.2f} s, expand + enqueue "
                      f"{figures['enqueue_s']:.2f} s (shard-list files {figures['shard_files_s']:.2f} s, "
                      f"CPU {figures['cpu_s']:.2f} s)", flush=True)  # fmt: skip
            loads.append(load_one())
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if args.enqueue_dir:
            shutil.rmtree(parent, ignore_errors=True)
    return {"specs": specs, "results": results, "load_1min": loads}


# -- the report ---------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_range(loads: list[float]) -> str:
    return f"{min(loads):.1f}-{max(loads):.1f}"


def print_tables(report: dict) -> None:
    throughput, reading = report.get("throughput"), report.get("input")
    if throughput:
        print(f"\nThroughput and CPU per image: medians of {report['args']['repeats']} interleaved repeats, "
              f"{report['args']['images']} images; load (1 min) {load_range(throughput['load_1min'])}, "
              f"input {load_range(reading['load_1min'])}")  # fmt: skip
        print("| input | img/s | ratio to local files | CPU/img labeler + store "
              "| images/batch | input CPU/img labeler + store | input alone |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for mode in MODES:
            rate, ratio = median(throughput["rates"][mode]), median(throughput["ratios"][mode])
            cpu, store = median(throughput["cpu"][mode]) * 1e3, median(throughput["store_cpu"][mode]) * 1e3
            in_cpu, in_store = median(reading["cpu"][mode]) * 1e3, median(reading["store_cpu"][mode]) * 1e3
            print(f"| {mode} | {rate:.1f} | {ratio:.2f} ({min(throughput['ratios'][mode]):.2f}-"
                  f"{max(throughput['ratios'][mode]):.2f}) | {cpu:.2f} + {store:.2f} ms "
                  f"| {median(throughput['batch_fill'][mode]):.1f} "
                  f"| {in_cpu:.3f} + {in_store:.3f} ms | {median(reading['rates'][mode]):.0f} img/s |")  # fmt: skip
        bad = {mode: n for mode, n in throughput["label_mismatches"].items() if n}
        print(f"top labels differing from local files' (all repeats): {bad or 'none'}")
    enqueue = report.get("enqueue")
    if enqueue:
        print(f"\nEnqueue: medians of {report['args']['enqueue_repeats']}; load (1 min) "
              f"{load_range(enqueue['load_1min'])}")  # fmt: skip
        print("| inputs | iter_input_paths alone | iter_input_paths + enqueue_run | of which shard-list files "
              "| CPU |")  # fmt: skip
        print("|---|---|---|---|---|")
        for name, values in enqueue["results"].items():
            spec = enqueue["specs"][name]
            spec = spec if spec.startswith("s3://") else "FOLDER"
            total = values["enqueue_s"]
            print(f"| {name} (`{spec}`) | {median(values['listing_s']):.2f} s | {median(total):.2f} s "
                  f"(range {min(total):.2f}-{max(total):.2f}) | {median(values['shard_files_s']):.2f} s "
                  f"| {median(values['cpu_s']):.2f} s |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="bundle (default: the tests' tiny 1/8-width ResNet-50)")
    parser.add_argument("--images", type=int, default=500, help="JPEGs labeled per way (default 500)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument(
        "--per-tar", type=int, default=100, help="samples per tar and rows per Parquet file (default 100)"
    )
    parser.add_argument("--row-group", type=int, default=100, help="Parquet rows per row group (default 100)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--input-passes", type=int, default=2, help="reads of every image per input-CPU figure (default 2)"
    )
    parser.add_argument(
        "--enqueue-repeats", type=int, default=3, help="repeats of the enqueue part (default 3)"
    )
    parser.add_argument("--enqueue-dir", type=Path, metavar="DIR",
                        help="make the enqueue's output folder under DIR (default: the temporary folder; "
                        "/dev/shm shows what the disk costs)")  # fmt: skip
    parser.add_argument("--enqueue-shards", type=int, default=10_000, help="tars enqueued (default 10,000)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the enqueue part")
    parser.add_argument("--skip-enqueue", action="store_true", help="no enqueue part")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure, per repeat, here")
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": machine_description(), "cpu": cpu_name(), "load_start": machine_load()}  # fmt: skip
    print(f"machine: {report['machine']}, {report['load_start']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_text, ExitStack() as stack:
        tmp = Path(tmp_text)
        if not args.skip_throughput:
            files = make_photo_set(tmp / "photos", args.images)
            tars = write_tars(files, tmp / "tars", args.per_tar)
            parquets = write_parquets(files, tmp / "parquet", args.per_tar, args.row_group)
            (tmp / "seaweedfs").mkdir()
            server = stack.enter_context(running_server(tmp / "seaweedfs"))
            admin = server.client()
            admin.pipe({f"{IMAGES_BUCKET}/loose/{p.name}": p.read_bytes() for p in files})
            admin.pipe({f"{IMAGES_BUCKET}/tars/{p.name}": p.read_bytes() for p in tars})
            admin.pipe({f"{IMAGES_BUCKET}/parquet/{p.name}": p.read_bytes() for p in parquets})
            os.environ.update(server.env())
            storage.clear_cache()
            ways = {
                "local files": [str(p) for p in files],
                "bucket objects": expand(f"s3://{IMAGES_BUCKET}/loose/"),
                "bucket tars": expand(f"s3://{IMAGES_BUCKET}/tars/{{00000..{len(tars) - 1:05d}}}.tar"),
                "bucket parquet": expand(f"s3://{IMAGES_BUCKET}/parquet/"),
                "local tars": expand(str(tmp / "tars")),
            }
            for mode, entries in ways.items():
                containers = sum(isinstance(e, Container) for e in entries)
                assert len(entries) == (args.images if containers == 0 else containers), (mode, len(entries))
            size = sum(p.stat().st_size for p in files) / len(files)
            print(f"images: {len(files)} JPEGs, about 500x375, {size / 1024:.0f} KiB on average; {len(tars)} tars "
                  f"of {args.per_tar} samples ({sum(p.stat().st_size for p in tars) / len(tars) / 2**20:.1f} MiB), "
                  f"{len(parquets)} Parquet files (row groups of {args.row_group}); store: SeaweedFS on loopback",
                  flush=True)  # fmt: skip
            bundle = args.model or tiny_bundle(tmp)
            print("throughput (labeling):", flush=True)
            report["throughput"] = bench_throughput(bundle, ways, args, server.process.pid, tmp)
            print(f"input CPU (reading alone, {args.input_passes} passes):", flush=True)
            report["input"] = bench_input(ways, args, server.process.pid)
        if not args.skip_enqueue:
            print("enqueue:", flush=True)
            report["enqueue"] = bench_enqueue(args, tmp)
    report["load_end"] = machine_load()
    report["seconds"] = time.perf_counter() - started
    print_tables(report)
    print(f"\n({report['seconds']:.0f} s; {report['load_end']})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
