"""Test-only: wrap the engine call of every runner a worker creates (for the FAKE GPU stand-ins
faulty_gpu.py and slow_gpu.py). Call 1 of each runner is its warm-up at load."""

from __future__ import annotations

from collections.abc import Callable

import worker.runners as runners

_real_create_runner = runners.create_runner


def wrap_engine_calls(before_call: Callable[[int, int], None]) -> None:
    """Make every runner created from now on call `before_call(n, images)` before its n-th engine call."""

    def create(*args, **kwargs):
        runner = _real_create_runner(*args, **kwargs)
        real_infer = runner._infer
        calls = {"n": 0}

        def infer(crops, want_features):
            calls["n"] += 1
            before_call(calls["n"], len(crops))
            return real_infer(crops, want_features)

        runner._infer = infer
        return runner

    runners.create_runner = create
