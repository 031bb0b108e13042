"""Chaos soak: a run over several real workers while workers and Redis are SIGKILLed (issue 18).

    python bench/bench_chaos.py [--images 2000] [--workers 3] [--duration-kill-window 120]
        [--kill-every-s 20] [--redis-kills 1] [--redis-losses 0] [--seed 0] [--json OUT]

A private redis-server (appendonly yes, appendfsync everysec, the tests' RedisServer), `--workers`
real `python -m worker worker` processes configured by LABELER_* only: production delivery settings
(visibility timeout 1 h, 3 attempts), leases of 4 s, heartbeat 1 s, sweep 1 s, concurrency 2,
batches of `--batch-size`, and the tests' tiny ResNet-50 slowed by the tests' stand-in engine
(`--include slow_gpu`, `--batch-sleep-s` per batch: a slow GPU, little CPU) so a few thousand small
JPEGs last minutes. The run is enqueued with `labeler enqueue` in shards of `--shard-size`. During
the first `--duration-kill-window` seconds a random ready worker is SIGKILLed every
`--kill-every-s` on average (0.5x-1.5x) and restarted 0.5-2 s later; Redis is SIGKILLed
`--redis-kills` times and restarted on its port and data folder 0.5-2 s later; `--redis-losses`
more crashes restart it from a copy of its AOF taken a second or more earlier (at least one shard
finished since), as a host that dies with its last second of writes unsynced; `--loss-moment
at-delivery` takes that copy at an instant when a worker holds a shard's message but has not yet
claimed the shard. The run is followed
to the end under `--timeout-s` (a hang is a failure, reported with the ledger's unfinished shards,
where their messages are and the worker log lines naming them). Then OUTPUT/labels/*.parquet is
read back with pyarrow: images, rows, distinct paths, duplicates, missing, error rows, stray files
(not listed in manifest.json, temporary files), manifest present; with the faults, the time to
finish after the last one and the total. Exits 1 if any invariant fails (the work folder, with
every worker's log, is kept then).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests" / "distributed")]  # this checkout
from chaos_helpers import ChaosPlan, run_soak  # noqa: E402
from common import machine_description, machine_load, tiny_bundle  # noqa: E402


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
        "unknown",
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--duration-kill-window", type=float, default=120.0, help="seconds of faults after the enqueue"
    )
    parser.add_argument(
        "--kill-every-s", type=float, default=20.0, help="mean seconds between worker SIGKILLs"
    )
    parser.add_argument("--redis-kills", type=int, default=1, help="Redis SIGKILLs, AOF intact")
    parser.add_argument(
        "--redis-losses", type=int, default=0, help="Redis SIGKILLs that lose the last writes"
    )
    parser.add_argument(
        "--loss-moment",
        choices=["any", "between-deliveries", "at-delivery"],
        default="any",
        help="where a loss's boundary falls (at-delivery: a worker has a shard's message, not yet its claim)",
    )
    parser.add_argument("--lose-window-s", type=float, default=1.0, help="at least this much of writes lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batch-sleep-s", type=float, default=1.0, help="stand-in engine time per batch")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="a run not finished by then hangs")
    parser.add_argument("--model", type=Path, help="bundle (default: the tests' tiny ResNet-50, built here)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()

    machine = f"{lscpu_model()} (lscpu); {machine_description()}"
    print(f"machine: {machine}, {machine_load()}")
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    bundle = args.model or tiny_bundle(folder / "bundles")
    plan = ChaosPlan(
        workers=args.workers,
        kill_window_s=args.duration_kill_window,
        kill_every_s=args.kill_every_s,
        redis_kills=args.redis_kills,
        redis_losses=args.redis_losses,
        lose_window_s=args.lose_window_s,
        loss_moment=args.loss_moment,
        timeout_s=args.timeout_s,
        seed=args.seed,
    )
    settings = {"batch_size": args.batch_size, "test_batch_sleep_s": args.batch_sleep_s}
    print(f"{args.images} images in shards of {args.shard_size}, {args.workers} workers, bundle {bundle}; "
          f"batches of {args.batch_size} at {args.batch_sleep_s} s; work folder {folder}")  # fmt: skip
    report = run_soak(folder / "soak", bundle, plan, args.images, args.shard_size, settings, use_cli=True)
    print(report.summary())
    print(f"after: {machine_load()}")
    failures = report.failures()
    if args.json:
        out = {
            "command": sys.argv,
            "machine": machine,
            "plan": vars(args) | {"model": str(bundle)},
            **report.as_dict(),
        }
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    if failures:
        print(f"work folder kept, with every worker's log: {folder / 'soak'}")
    elif args.workdir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
