"""What a worker says at start-up about its own configuration, when it will make the worker
refuse work: better one line in the worker's log now than a failed run later."""

from __future__ import annotations

import os
from pathlib import Path

from worker.dataset.storage import is_url
from worker.settings import Settings, env_name, output_roots
from worker.sidecar import ModelSpec


def _writable(folder: str) -> bool:
    """The folder, or the nearest folder above it that exists (it is made on the first write), is
    a folder this process may write into."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK)


def configuration_warnings(settings: Settings) -> list[str]:
    """One sentence per setting that will make this worker refuse (and fail) some runs."""
    warnings = []
    roots = output_roots(settings)
    if not settings.output_roots:
        warnings.append(
            f"{env_name('output_roots')} is not set: this worker writes datasets only under {roots[0]}; "
            "a run whose output is elsewhere will be failed (set it to the folders or bucket prefixes runs write to)"
        )
    for root in roots:
        if not is_url(root) and not _writable(root):
            warnings.append(f"output root {root} is not a folder this worker can write: runs under it will fail")
    if settings.model:
        try:
            spec = ModelSpec.load(Path(settings.model))
        except (OSError, ValueError, KeyError) as exc:
            warnings.append(f"cannot read the bundle's sidecar at {settings.model}: {exc}")
        else:
            if not spec.features_output:
                warnings.append(
                    "this worker's bundle has no features output: a run enqueued with --embeddings will be failed"
                )
    return warnings
