"""Incremental runs (issue 22): deciding the delta of a 10 M-image corpus against a 10 M-row
earlier dataset, time and peak memory, against the obvious way (a Python set of the earlier
(path, version) pairs) measured in the same run.

    python bench/bench_delta.py [--rows 10000000] [--new 0.05] [--changed 0.01] [--json OUT]

The earlier dataset is written once (untimed) as a real dataset of the current schema: shard files
of 100,000 rows (paths /corpus/dNNNN/NNNNNNNNN.jpg, a `SIZE:MTIME_NS` version each, 1 % error
rows; the label columns are left null, since the delta reads only path, source_url,
source_version and error_code) and its manifest, through the same write_manifest a run uses.
The corpus is the same paths, `--changed` of them with a new version, and `--new` more paths;
it is streamed as a `labeler run` listing streams it (one path string at a time).

Each way runs in its own fresh process (peak RSS from getrusage is the process's own):
- `digests` (the product): build_index (earlier rows -> sorted 128-bit digests, one Arrow batch at
  a time) + skip_done (the corpus in chunks, one vectorized lookup each);
- `python set` (baseline): the earlier (path, version) pairs of label rows in a set of tuples,
  then one membership test per corpus path.
Both must leave out exactly the same inputs (checked). Versions come from a function of the path
(the bench has no 10 M files to stat): a stat per local file or a HEAD per object is the cost of
knowing a source did not change, the same for both ways and reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_description  # noqa: E402

SHARD_ROWS = 100_000
MODEL = "ab" * 32


def path_of(i: int) -> str:
    return f"/corpus/d{i // 10000:04d}/{i:09d}.jpg"


def version_of_index(i: int, changed: bool = False) -> str:
    return f"{20000 + i % 9000}:{1764000000000000000 + i * 1000 + (7 if changed else 0)}"


def write_earlier(out: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from worker.dataset.files import shard_path
    from worker.dataset.manifest import write_manifest
    from worker.dataset.schema import DatasetSpec, dataset_schema

    spec = DatasetSpec(model_sha256=MODEL, precision="fp32")
    schema = dataset_schema(spec)
    ids = []
    for shard, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        index = range(start, start + n)
        error = [("decode_failed" if i % 100 == 99 else None) for i in index]
        columns = {
            "path": pa.array([path_of(i) for i in index]),
            "error_code": pa.array(error, pa.string()),
            "error_message": pa.array([None if e is None else "bad" for e in error], pa.string()),
            "model_sha256": pa.array([MODEL] * n),
            "precision": pa.array(["fp32"] * n),
            "worker": pa.array(["bench"] * n),
            "labeled_at": pa.array([1764000000000000] * n, pa.timestamp("us", tz="UTC")),
            "shard_id": pa.array([f"{shard:06d}"] * n),
            "source_version": pa.array([version_of_index(i) for i in index]),
        }
        table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)
        path = shard_path(out, f"{shard:06d}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=SHARD_ROWS)
        ids.append(f"{shard:06d}")
    write_manifest(out, run_id="earlier", shard_ids=ids, spec=spec, settings={})


def corpus(rows: int, new: float, changed: float):
    """(path, version) of the corpus, streamed: the earlier paths (every 1/changed-th with a new
    version), then the new ones."""
    every = round(1 / changed) if changed else 0
    for i in range(rows):
        yield path_of(i), version_of_index(i, bool(every) and i % every == 0)
    for i in range(rows, rows + int(rows * new)):
        yield path_of(i), version_of_index(i)


def child(way: str, earlier: str, rows: int, new: float, changed: float) -> dict:
    from worker.delta.counts import DeltaCounts
    from worker.delta.lineage import resolve_chain

    versions = dict[str, str]()  # the corpus's versions, keyed per chunk (see version_of)
    started = time.perf_counter()
    kept = 0
    if way == "digests":
        from worker.delta.skip import build_index, skip_done

        counts = DeltaCounts()
        chain = resolve_chain([earlier])

        def paths():
            for path, version in corpus(rows, new, changed):
                versions[path] = version
                yield path

        def version_of(names):
            found = [versions.pop(name) for name in names]
            return found

        index = build_index(chain, MODEL, "fp32", False, counts)
        built = time.perf_counter() - started
        for _path in skip_done(paths(), lambda: index, counts, version_of=version_of):
            kept += 1
        skipped = counts.images
    else:
        from worker.dataset.files import iter_batches

        done: set[tuple[str, str]] = set()
        for batch in iter_batches(Path(earlier), columns=["path", "source_version", "error_code"]):
            for path, version, code in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                if code is None:
                    done.add((path, version))
        built = time.perf_counter() - started
        skipped = 0
        for pair in corpus(rows, new, changed):
            if pair in done:
                skipped += 1
            else:
                kept += 1
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"way": way, "seconds": seconds, "index_seconds": built, "peak_rss_mb": peak, "kept": kept, "skipped": skipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--new", type=float, default=0.05)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--ways", default="digests,python set")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--earlier", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.earlier, args.rows, args.new, args.changed)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmp:
        earlier = Path(tmp) / "earlier"
        started = time.perf_counter()
        write_earlier(earlier, args.rows)
        print(f"earlier dataset: {args.rows} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        results = []
        for way in args.ways.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--child", way, "--earlier", str(earlier), "--rows", str(args.rows),
                 "--new", str(args.new), "--changed", str(args.changed)],
                capture_output=True, text=True, check=True, cwd=REPO,
            )  # fmt: skip
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    kept = {r["kept"] for r in results}
    assert len(kept) == 1, f"the ways disagree on the delta: {results}"
    summary = {"machine": machine_description(), "rows": args.rows, "new": args.new, "changed": args.changed,
               "results": results}  # fmt: skip
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    os.environ.pop("_", None)


if __name__ == "__main__":
    main()
