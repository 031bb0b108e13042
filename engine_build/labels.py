"""Class names: from a labels file, ImageNet's list, or numbered placeholders."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from engine_build.errors import BuildError


def read_labels_file(path: Path, expected: int | None = None) -> list[str]:
    """One class name per line, in class-index order (blank lines ignored)."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise BuildError(f"labels file not found: {path}") from None
    if expected is not None and len(names) != expected:
        raise BuildError(f"{path} has {len(names)} labels but the model has {expected} classes")
    return names


def imagenet_labels() -> list[str]:
    text = resources.files("engine_build").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != 1000:
        raise BuildError(f"packaged ImageNet class list has {len(names)} names, expected 1000")
    return names


def placeholder_labels(count: int) -> list[str]:
    return [f"class_{index}" for index in range(count)]
