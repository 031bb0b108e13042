"""The chain of earlier datasets a run builds on, as its manifest's `lineage` records it.

`--skip-done-in A` names a finished dataset (a manifest, so its rows are complete); A's own lineage
names what A built on, so naming last night's dataset is enough: the chain is followed to its start
and recorded flat, newest first, each dataset once. A moved or unfinished dataset stops the run
with a message that says which and why, never a run that relabels everything silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from worker.dataset.atomic import atomic_write, ensure_dir
from worker.dataset.manifest import read_manifest
from worker.dataset.object_path import Location, LocationLike, as_location
from worker.dataset.schema import DatasetError
from worker.dataset.shard_list import shards_dir, stored_root_shards
from worker.dataset.storage import is_url


class LineageError(ValueError):
    """An earlier dataset that cannot be built on: missing, unfinished, or of another schema."""


@dataclass(frozen=True)
class EarlierDataset:
    """One finished dataset of the chain, as its manifest describes it."""

    location: str  # an absolute folder, or a dataset URL (s3://bucket/prefix)
    run_id: str
    model_sha256: str
    precision: str
    rows: int
    finished_at: str
    named: bool  # named by this run (False: reached through another dataset's lineage)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EarlierDataset:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    def same_model(self, model_sha256: str, precision: str) -> bool:
        return self.model_sha256 == model_sha256 and self.precision == precision


def dataset_location(text: str) -> str:
    """One spelling per dataset: a URL without its trailing slash, a folder made absolute."""
    return text.rstrip("/") if is_url(text) else os.path.abspath(os.path.expanduser(text))


def resolve_chain(named: Sequence[str], out_dir: str | None = None) -> list[EarlierDataset]:
    """The datasets `named` and, through their manifests' lineage, those they built on: newest
    first, each once. `out_dir` (this run's own output) may not be one of them."""
    chain: list[EarlierDataset] = []
    seen: set[str] = set()
    own = dataset_location(out_dir) if out_dir is not None else None
    for text in named:
        location = dataset_location(text)
        if location == own:
            raise LineageError(f"--skip-done-in {text} is this run's own --out: name the earlier dataset")
        if location in seen:
            continue
        seen.add(location)
        manifest = _finished_manifest(location, text)
        chain.append(_entry(location, manifest, named=True))
        for earlier in recorded_chain(manifest, location):
            if earlier.location not in seen and earlier.location != own:
                seen.add(earlier.location)
                _finished_manifest(earlier.location, f"{earlier.location} (in the lineage of {text})")
                chain.append(EarlierDataset(**{**earlier.to_json(), "named": False}))
    return chain


def lineage_json(chain: Iterable[EarlierDataset]) -> list[dict[str, Any]]:
    return [earlier.to_json() for earlier in chain]


def recorded_chain(manifest: dict[str, Any], where: str) -> list[EarlierDataset]:
    """The chain a finished run's manifest names (empty for a run that built on nothing)."""
    try:
        return [EarlierDataset.from_json(entry) for entry in manifest.get("lineage") or []]
    except (KeyError, TypeError) as exc:
        raise LineageError(f"{where}: its manifest's lineage is damaged ({exc})") from None


def _finished_manifest(location: str, said: str) -> dict[str, Any]:
    try:
        manifest = read_manifest(as_location(location))
    except DatasetError as exc:
        raise LineageError(f"--skip-done-in {said}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise LineageError(f"--skip-done-in {said}: cannot read its manifest ({type(exc).__name__}: {exc})") from None
    if manifest is None:
        raise LineageError(
            f"--skip-done-in {said}: no manifest.json there, so not a finished labeler dataset "
            "(finish that run first, e.g. the same `labeler run` with --resume, or name another)"
        )
    return manifest


def _entry(location: str, manifest: dict[str, Any], named: bool) -> EarlierDataset:
    model = manifest.get("model") or {}
    return EarlierDataset(
        location=location,
        run_id=str(manifest.get("run_id", "")),
        model_sha256=str(model.get("sha256", "")),
        precision=str(model.get("precision", "")),
        rows=int((manifest.get("counts") or {}).get("rows", 0)),
        finished_at=str(manifest.get("finished_at", "")),
        named=named,
    )


LINEAGE_FILE = "lineage.json"  # beside the shard list: what the run builds on, fixed at its start


def _lineage_path(out_dir: LocationLike) -> Location:
    return shards_dir(out_dir) / LINEAGE_FILE


def _stored(out_dir: LocationLike) -> dict[str, Any] | None:
    try:
        return json.loads(_lineage_path(out_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def stored_lineage(out_dir: LocationLike) -> list[dict[str, Any]]:
    """The lineage a run stored at its start, for its manifest (empty: it built on nothing)."""
    return list((_stored(out_dir) or {}).get("lineage") or [])


def settle_lineage(out_dir: LocationLike, chain: list[EarlierDataset] | None, skip_failed: bool) -> tuple[list[EarlierDataset], bool]:
    """The chain (and `skip_failed`) this run builds on, stored with its shard list at its start so
    a resume decides the same delta: a resume that names none takes the stored one; one that names
    another is refused (its shard list was cut against the first)."""
    stored = _stored(out_dir)
    if stored is not None:
        kept = [EarlierDataset.from_json(entry) for entry in stored.get("lineage") or []]
        if chain is not None and [e.location for e in chain] != [e.location for e in kept]:
            raise LineageError(
                f"{out_dir} was started on --skip-done-in {', '.join(e.location for e in kept if e.named) or '(none)'}: "
                "resume it with the same, or start a new run"
            )
        return kept, bool(stored.get("skip_failed"))
    if not chain:
        return [], skip_failed  # a run that builds on nothing stores nothing
    if stored_root_shards(out_dir):
        raise LineageError(f"{out_dir} was started without --skip-done-in: resume it without, or start a new run")
    path = _lineage_path(out_dir)
    ensure_dir(path.parent)
    data = (json.dumps({"lineage": lineage_json(chain), "skip_failed": skip_failed}, indent=1) + "\n").encode()
    atomic_write(path, lambda handle: handle.write(data))
    return chain, skip_failed
