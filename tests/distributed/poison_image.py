"""Test-only STAND-IN for an image that kills its worker, loaded with `--include poison_image`.

A decoder segfault or an out-of-memory kill on one file cannot be produced on purpose here, so
reading any file whose name contains "poison" ends the process at once (os._exit), as a crash would.
Everything else (Celery's prefork pool, the leases, the sweep, the bisection) is production code.
"""

from __future__ import annotations

import os

import worker.pipeline.service as service

_read = service.read_image


def _read_unless_poison(path, policy):
    if "poison" in os.path.basename(path):
        os._exit(3)
    return _read(path, policy)


service.read_image = _read_unless_poison
