"""The chain of nightly datasets against a model, under random histories of a folder (hypothesis):
files added, touched, rewritten, broken, mended and deleted between nights. After every night:

- the night's dataset holds exactly the files that are new, changed since their last row, or whose
  last row was an error (and nothing else: what is unchanged and labeled is left out);
- across the chain no file is labeled twice at one version (exactly once per model and version);
- the chain read back (`iter_union_records`) has one row per file ever labeled, the newest: for a
  file that exists, the row of its current version.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.dataset.files import iter_records
from worker.delta.lineage import resolve_chain
from worker.delta.union import iter_union_records
from worker.local.dataset_run import run_local_dataset
from worker.pipeline.inputs import iter_input_paths
from worker.pipeline.service import LabelingService, ServiceOptions
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

SLOTS = 5
ACTIONS = ("write", "touch", "break", "delete")
nights = st.lists(st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, SLOTS - 1)), max_size=4),
                  min_size=2, max_size=4)  # fmt: skip


def version(path: Path) -> str:
    info = path.stat()
    return f"{info.st_size}:{info.st_mtime_ns}"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=nights)
def test_the_chain_follows_the_folder(tmp_path_factory, photos, tiny_bundle, history) -> None:
    root = tmp_path_factory.mktemp("chain")
    folder = root / "images"
    folder.mkdir()
    photo = photos[sorted(photos)[0]][..., ::-1]
    clock = [1_700_000_000_000_000_000]

    def act(action: str, slot: int) -> None:
        path = folder / f"{slot}.jpg"
        clock[0] += 1_000_000_000  # every change a second later: versions never collide here
        if action == "delete":
            path.unlink(missing_ok=True)
            return
        if action == "touch" and not path.exists():
            return
        if action == "write":
            path.write_bytes(cv2.imencode(".jpg", cv2.resize(photo, (40 + 8 * slot + clock[0] % 7, 48)))[1].tobytes())
        elif action == "break":
            path.write_bytes(b"broken " * (slot + 1))
        os.utime(path, ns=(clock[0], clock[0]))

    for slot in range(SLOTS - 2):
        act("write", slot)
    last: dict[str, tuple[str, bool]] = {}  # path -> (version of its newest row, an error row)
    datasets: list[Path] = []
    for night, changes in enumerate(history):
        for action, slot in changes:
            act(action, slot)
        current = {str(p): version(p) for p in folder.iterdir()}
        expected = {p for p, v in current.items() if last.get(p) != (v, False)}
        out = root / f"night{night}"
        service = LabelingService(OnnxRuntimeRunner(tiny_bundle, intra_op_threads=1),
                                  ServiceOptions(max_batch_size=4, max_wait_s=0.0, decode_threads=1))  # fmt: skip
        chain = resolve_chain([str(datasets[-1])]) if datasets else None
        summary = run_local_dataset(iter_input_paths([str(folder)]), service, out, skip_done_in=chain)
        assert summary.complete
        rows = {row["path"]: row for row in iter_records(out)}
        assert set(rows) == expected, (night, changes)
        for path, row in rows.items():
            assert row["source_version"] == current[path]
            last[path] = (row["source_version"], "error" in row)
        datasets.append(out)
        union = {row["path"]: row for row in iter_union_records(str(out))}
        assert set(union) == set(last)
        assert all(union[p]["source_version"] == last[p][0] for p in union)

    labeled = [(row["path"], row["source_version"]) for out in datasets for row in iter_records(out) if "labels" in row]
    assert len(labeled) == len(set(labeled)), "a file labeled twice at one version"
