"""The bundle sidecar (`model.json`): the one place preprocessing and labels are defined.

The worker, calibration and every engine read preprocessing from here, so serving, calibration and
export can never disagree. The graph in a bundle takes uint8 crops (N, H, W, 3) in the channel order
the decoder produces (BGR for OpenCV); channel reordering, mean/std and the layout change to what the
imported model expects all live inside the graph.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

SIDECAR_NAME = "model.json"
FORMAT_VERSION = 1

ResizePolicy = Literal["shorter_side", "exact"]
ChannelOrder = Literal["RGB", "BGR"]
Layout = Literal["NCHW", "NHWC"]


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes the model's input, as the model was trained.

    `resize="shorter_side"`: scale the shorter side to `resize_size`, then center-crop `crop_size`
    (torchvision's Resize(256) + CenterCrop(224)). `resize="exact"`: scale straight to `crop_size`
    (Keras' image_dataset_from_directory). Mean and std are in 0..1 units of the pixel value, in
    `model_channel_order` (caffe-style 0..255 means are mean/255 with std 1/255).
    """

    crop_size: tuple[int, int] = (224, 224)
    resize_size: int = 256
    resize: ResizePolicy = "shorter_side"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    model_channel_order: ChannelOrder = "RGB"
    model_layout: Layout = "NCHW"

    def __post_init__(self) -> None:
        if self.resize not in ("shorter_side", "exact"):
            raise ValueError(f"unknown resize policy {self.resize!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need three values each, std positive")
        if self.resize == "shorter_side" and self.resize_size < min(self.crop_size):
            raise ValueError("resize_size must be at least the crop size")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            crop_size=tuple(data["crop_size"]),
            resize_size=int(data["resize_size"]),
            resize=data["resize"],
            interpolation=data.get("interpolation", "bilinear"),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            model_channel_order=data["model_channel_order"],
            model_layout=data["model_layout"],
        )


@dataclass(frozen=True)
class ModelInput:
    """The bundle graph's input: uint8 crops, batch axis dynamic."""

    name: str = "images"
    height: int = 224
    width: int = 224
    channel_order: ChannelOrder = "BGR"
    layout: Layout = "NHWC"
    dtype: str = "uint8"

    @property
    def shape(self) -> list[int | str]:
        return ["batch", self.height, self.width, 3]


@dataclass(frozen=True)
class ModelSpec:
    """Everything a runner needs to know about a bundle besides the graph itself."""

    preprocessing: Preprocessing
    classes: tuple[str, ...]
    model_file: str = "model.onnx"
    input: ModelInput = field(default_factory=ModelInput)
    probabilities_output: str = "probabilities"
    features_output: str | None = None
    feature_size: int | None = None
    precision: str = "fp32"
    checksum_sha256: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def precisions(self) -> list[str]:
        """The precisions this bundle has a model for: its own (fp32 unless imported otherwise)
        and every variant built into it."""
        return sorted({"fp32", self.precision, *self.variants})

    def model_for(self, precision: str) -> tuple[str, str]:
        """(file name inside the bundle, expected sha256) of the model for `precision`; the one
        place every runner and the engine builder ask. KeyError names what the bundle has."""
        if precision in ("fp32", self.precision):
            return self.model_file, self.checksum_sha256
        info = self.variants.get(precision)
        if info is None:
            raise KeyError(f"bundle has no {precision!r} model (has: {', '.join(self.precisions())})")
        return info["file"], info["sha256"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels_meaningful(self) -> bool:
        return bool(self.source.get("labels_meaningful", True))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        data["num_classes"] = self.num_classes
        data["input"]["shape"] = self.input.shape
        data["classes"] = list(self.classes)
        data["warnings"] = list(self.warnings)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"sidecar format_version {version!r}; this labeler reads {FORMAT_VERSION}")
        classes = tuple(str(c) for c in data["classes"])
        if data.get("num_classes", len(classes)) != len(classes):
            raise ValueError("sidecar num_classes does not match its class list")
        raw_input = dict(data["input"])
        raw_input.pop("shape", None)
        return cls(
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            classes=classes,
            model_file=data["model_file"],
            input=ModelInput(**raw_input),
            probabilities_output=data["probabilities_output"],
            features_output=data.get("features_output"),
            feature_size=data.get("feature_size"),
            precision=data.get("precision", "fp32"),
            checksum_sha256=data["checksum_sha256"],
            source=dict(data.get("source", {})),
            warnings=tuple(data.get("warnings", ())),
            variants=dict(data.get("variants", {})),
        )

    def save(self, bundle_dir: Path) -> Path:
        path = Path(bundle_dir) / SIDECAR_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, bundle_dir: Path) -> ModelSpec:
        path = Path(bundle_dir) / SIDECAR_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{bundle_dir} is not a model bundle: {SIDECAR_NAME} is missing")
        return cls.from_dict(json.loads(path.read_text()))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def summarize(spec: ModelSpec, bundle_dir: Path | None = None) -> str:
    """A human-readable summary, printed by `labeler build` and `labeler inspect`."""
    prep = spec.preprocessing
    if prep.resize == "shorter_side":
        resize = f"shorter side to {prep.resize_size}, center crop {prep.crop_size[0]}x{prep.crop_size[1]}"
    else:
        resize = f"resize to {prep.crop_size[0]}x{prep.crop_size[1]} (no crop)"
    names = ", ".join(spec.classes[:5]) + (", ..." if spec.num_classes > 5 else "")
    lines = [
        f"bundle      {bundle_dir}" if bundle_dir else None,
        f"model       {spec.model_file} ({spec.precision}), sha256 {spec.checksum_sha256[:16]}...",
        f"input       {spec.input.name} uint8 {spec.input.shape} {spec.input.channel_order} crops",
        f"resize      {resize}, {prep.interpolation}",
        f"normalize   mean {list(prep.mean)} std {list(prep.std)} (0..1 units)",
        f"model sees  {prep.model_channel_order} {prep.model_layout} float32 (done in the graph)",
        f"classes     {spec.num_classes}: {names}",
        f"outputs     {spec.probabilities_output}"
        + (f", {spec.features_output} ({spec.feature_size}-d)" if spec.features_output else ""),
        f"built from  {spec.source.get('kind', '?')}: {spec.source.get('description', '')}",
    ]
    for variant, info in sorted(spec.variants.items()):
        lines.append(f"variant     {variant}: {info.get('file')}{_variant_notes(info)}")
    lines += [f"WARNING     {w}" for w in spec.warnings]
    return "\n".join(line for line in lines if line)


def _variant_notes(info: dict[str, Any]) -> str:
    """' (for onnxruntime (CPU); 2 layers kept FP32)': where a variant runs, what the gate kept FP32."""
    notes = [f"for {info['runs_on']}"] if info.get("runs_on") else []
    if "fp32_layers" in info:
        notes.append(f"{len(info['fp32_layers'])} layers kept FP32")
    return f" ({'; '.join(notes)})" if notes else ""
