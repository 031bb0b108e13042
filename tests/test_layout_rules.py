"""The house rules, checked on the code's own imports (every import, lazy ones inside functions too).

- Only the command line (`worker/cli/`) may import `engine_build`: the runtime gets a bundle path.
- `worker/client/` never imports the Celery worker or the pipeline, and `worker/ledger/` (the Redis
  contract) and `worker/dataset/` (the dataset on storage) imports neither Celery nor OpenCV nor the pipeline: a machine that only enqueues and
  reads results needs no engine, no OpenCV and no worker.
- Nothing below the command line imports it.
- The runners and their loaders import tensorrt, pycuda and torch only inside the calls that need
  them, so a CPU worker (and choosing a backend) never loads them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "worker"

# (the package, or file, whose imports are checked; module prefixes it must not import)
RULES = [
    ("worker/pipeline", ("engine_build", "worker.cli", "worker.celery_worker", "worker.client", "celery", "redis")),
    ("worker/runners", ("engine_build", "worker.cli", "worker.pipeline", "worker.celery_worker", "celery")),
    ("worker/local", ("engine_build", "worker.cli", "worker.celery_worker", "worker.client", "celery")),
    ("worker/celery_worker", ("engine_build", "worker.cli", "worker.client")),
    ("worker/ledger", ("engine_build", "worker.cli", "worker.pipeline", "worker.celery_worker", "worker.client",
                       "worker.runners", "celery", "cv2")),
    ("worker/dataset", ("engine_build", "worker.cli", "worker.pipeline", "worker.celery_worker", "worker.client",
                        "worker.runners", "worker.ledger", "celery", "cv2", "redis")),
    ("worker/client", ("engine_build", "worker.cli", "worker.celery_worker", "worker.pipeline", "worker.runners",
                       "celery", "cv2")),
    ("worker/delta", ("engine_build", "worker.cli", "worker.pipeline", "worker.celery_worker", "worker.client",
                      "worker.runners", "worker.ledger", "worker.local", "celery", "cv2", "redis")),
    ("worker/records.py", ("engine_build", "worker.")),
    ("worker/sidecar.py", ("engine_build", "worker.")),
    ("worker/resnet.py", ("engine_build", "worker.")),
]  # fmt: skip


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, module) for every import in a file under `root`, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def violations(place: str, forbidden: tuple[str, ...], root: Path = REPO) -> list[str]:
    """The imports of `place` (a package or file under `root`, the tree's top) that `forbidden` names."""
    target = root / place
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    out = []
    for file in files:
        for line, module in imported_modules(file, root):
            for prefix in forbidden:
                if module == prefix.rstrip(".") or module.startswith(prefix if prefix.endswith(".") else prefix + "."):
                    out.append(f"{file.relative_to(root)}:{line} imports {module}")
    return out


@pytest.mark.parametrize(("place", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_layer_imports_only_what_it_may(place: str, forbidden: tuple[str, ...]) -> None:
    assert (REPO / place).exists(), f"{place} is gone: update the rules with the layout"
    assert violations(place, forbidden) == []


def test_engine_build_is_imported_only_by_the_command_line() -> None:
    outside = [
        hit
        for file in sorted(WORKER.rglob("*.py"))
        if WORKER / "cli" not in file.parents
        for hit in violations(str(file.relative_to(REPO)), ("engine_build",))
    ]
    assert outside == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """A rule that can never fail is no rule: plant each kind of import in a tree of its own (never
    in the source tree, which other tests and tools read meanwhile) and see it caught."""
    planted = tmp_path / "worker" / "ledger" / "_planted_for_test.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(
        "def later():\n    from engine_build.weights import random_weights\n\n"
        "from ..pipeline import service\nimport cv2 as opencv\n"
    )
    found = violations("worker/ledger", ("engine_build", "worker.pipeline", "cv2"), root=tmp_path)
    assert found[0].startswith("worker/ledger/_planted_for_test.py:")
    assert sorted(hit.split(" imports ")[1] for hit in found) == [
        "cv2",
        "engine_build.weights",
        "engine_build.weights.random_weights",
        "worker.pipeline",
        "worker.pipeline.service",
    ]


def run_without(blocked: tuple[str, ...], code: str) -> str:
    """Run `code` in a fresh interpreter where the `blocked` modules cannot be imported; its stdout."""
    prelude = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    result = subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_client_side_loads_without_opencv_celery_or_an_engine() -> None:
    """What `labeler enqueue/status/results/report` need, imported with cv2, celery, onnxruntime
    and engine_build made unimportable."""
    code = (
        "import worker.client.enqueue, worker.client.export, worker.client.retry, worker.client.status\n"
        "import worker.client.report, worker.ledger.ledger, worker.ledger.activity, worker.ledger.protocol\n"
        "import worker.settings, worker.dataset.files, worker.dataset.shard_list\n"
        "print('ok')\n"
    )
    assert run_without(("cv2", "celery", "onnxruntime", "engine_build", "torch"), code).strip() == "ok"


def test_client_commands_run_without_opencv_onnxruntime_or_torch() -> None:
    """The command line itself (which registers every command) loads on a client machine."""
    code = (
        "from worker.cli import main\n"
        "for command in ('enqueue', 'status', 'results', 'retry', 'report'):\n"
        "    main([command, '--help'], standalone_mode=False)\n"
    )
    assert run_without(("cv2", "onnxruntime", "torch"), code).count("Usage:") == 5


def test_runners_and_their_loaders_import_without_tensorrt_pycuda_or_torch() -> None:
    code = (
        "import worker.runners, worker.runners.tensorrt_loader, worker.runners.tensorrt_runner\n"
        "import worker.runners.torch_loader, worker.runners.torch_cuda_runner, worker.runners.torch_weights\n"
        "print('ok')\n"
    )
    assert run_without(("tensorrt", "pycuda", "torch", "onnx"), code).strip() == "ok"
