"""What an incremental run left out, for its summary (kept apart so summaries need no Arrow)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeltaCounts:
    images: int = 0  # loose images left out (unchanged, labeled before by the same model)
    containers: int = 0  # container shards left out whole
    container_images: int = 0  # their samples, where known without reading them
    done_rows: int = 0  # entries in the done index (rows, and container files once each)
    other_models: list[str] = field(default_factory=list)  # chain datasets of another model: none of theirs count

    def lines(self) -> list[str]:
        out = list(self.other_models)
        if self.done_rows or self.images or self.containers:
            samples = f" ({self.container_images} samples)" if self.container_images else ""
            out.append(f"unchanged since an earlier dataset, left out: {self.images} images, "
                       f"{self.containers} container shards{samples}")  # fmt: skip
        return out
