"""Loading ResNet-50 weights: torchvision state_dicts, full checkpoints, ImageNet, or seeded random.

Checkpoints are loaded with `weights_only=True`: a .pth file is a pickle, and weights from the
internet must not be able to run code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_build.errors import BuildError

IMAGENET_WEIGHTS_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
IMAGENET_WEIGHTS_FILE = "resnet50-0676ba61.pth"  # torchvision IMAGENET1K_V1, 76.13% top-1
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "model.", "backbone.")


@dataclass
class LoadedWeights:
    state_dict: dict[str, Any]
    num_classes: int
    description: str
    labels_meaningful: bool = True
    imagenet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def load_weights_file(path: Path) -> LoadedWeights:
    """A torchvision-style state_dict, or a training checkpoint that wraps one."""
    import torch

    try:
        loaded = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BuildError(f"weights file not found: {path}") from None
    except Exception as exc:
        raise BuildError(
            f"could not load {path} as PyTorch weights with weights_only=True ({type(exc).__name__}: {exc}). "
            "Save the model's state_dict (torch.save(model.state_dict(), path)) and pass that file."
        ) from None
    state = _unwrap(loaded)
    if "fc.weight" not in state:
        raise BuildError(f"{path} has no fc.weight: not a torchvision-style ResNet-50 state_dict")
    return LoadedWeights(state, int(state["fc.weight"].shape[0]), f"weights file {Path(path).resolve()}")


def _unwrap(loaded: Any) -> dict[str, Any]:
    if isinstance(loaded, dict):
        for key in _CHECKPOINT_KEYS:
            if key in loaded and isinstance(loaded[key], dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict):
        raise BuildError("checkpoint holds no state_dict (a dict of tensors)")
    state = dict(loaded)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def imagenet_weights(cache_dir: Path, timeout_s: float = 30.0) -> LoadedWeights:
    """torchvision's ImageNet ResNet-50 weights, from the cache or downloaded once."""
    target = Path(cache_dir) / IMAGENET_WEIGHTS_FILE
    if not target.is_file():
        _download(IMAGENET_WEIGHTS_URL, target, timeout_s)
    weights = load_weights_file(target)
    weights.description = f"torchvision ImageNet weights (IMAGENET1K_V1) {IMAGENET_WEIGHTS_FILE}"
    weights.imagenet = True
    return weights


def _download(url: str, target: Path, timeout_s: float) -> None:
    import hashlib
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:
            digest = hashlib.sha256()
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise BuildError(
            f"cannot download the ImageNet weights from {url} ({exc}). Offline? Fetch "
            f"{IMAGENET_WEIGHTS_FILE} on a machine with internet, copy it here and pass "
            f"--weights /path/to/{IMAGENET_WEIGHTS_FILE} (or put it in {target.parent})."
        ) from None
    expected_prefix = IMAGENET_WEIGHTS_FILE.split("-")[1].split(".")[0]
    if not digest.hexdigest().startswith(expected_prefix):
        partial.unlink(missing_ok=True)
        raise BuildError(f"downloaded weights fail the hash check (want sha256 {expected_prefix}...)")
    os.replace(partial, target)


def random_weights(num_classes: int, seed: int = 0, base_width: int = 64) -> LoadedWeights:
    """Seeded random weights: a pipeline that runs, whose labels mean nothing."""
    import torch

    from worker.resnet import resnet50

    torch.manual_seed(seed)
    model = resnet50(num_classes, base_width)
    return LoadedWeights(
        model.state_dict(),
        num_classes,
        f"seeded random weights (seed {seed}, base width {base_width})",
        labels_meaningful=False,
        extra={"seed": seed, "base_width": base_width},
    )


def infer_base_width(state: dict[str, Any]) -> int:
    """64 for ResNet-50; smaller for the test-size variants."""
    return int(state["conv1.weight"].shape[0])
