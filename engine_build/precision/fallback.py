"""Mixed precision chosen by the gate: when INT8 misses it, keep the fewest, most harmful layers in FP32.

A layer "falls back" by losing the Q/DQ pairs on its inputs: its activation input is wired to the
float tensor before QuantizeLinear and its weight to the FP32 initializer, so the graph stays in
the Q/DQ form TensorRT accepts and that layer runs in float (TensorRT 11 networks are strongly
typed: no Q/DQ, no INT8). No recalibration is needed, every other layer keeps its scales.

Sensitivity of a layer: the model with only that layer in INT8 (all others fall back) is run on
calibration crops and compared with FP32: mean KL divergence of the probabilities (smooth, so
layers whose damage never flips a label on a small set still rank), with top-1 agreement and
top-5 overlap reported beside it. The layers are then kept in FP32 in that order, one more at a
time, until the gate passes on the search half of the held-out crops or the budget (most layers
allowed) is spent. The layers are ranked on calibration images only; the search half only decides
how many; the other half, never used to choose, gives the verdict (variants.py). The ranking is
cached in the bundle (sensitivity.py), so a rebuild with another gate or budget does not redo it.
Both INT8 forms fall back the same way: in the CPU form (cpu_int8.py) a layer's output Q/DQ stays
for the INT8 layers that read it, and the float tensor before it is what a fallen-back reader gets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from engine_build.precision.evaluate import run_onnx
from engine_build.precision.gate import GateResult, GateThresholds, compare

MODES = ("auto", "none")
DEFAULT_MAX_LAYERS = 32  # a cap, not a target: the search keeps the fewest layers that pass
DEFAULT_SENSITIVITY_IMAGES = 128
# Every layer is first measured on COARSE crops; only the REFINE most harmful are measured again on
# all sensitivity images (bench/bench_sensitivity.py: the order that matters, at about half the runs).
DEFAULT_COARSE_IMAGES = 32
DEFAULT_REFINE_LAYERS = 16


@dataclass(frozen=True)
class FallbackSettings:
    mode: str = "auto"  # auto: search when INT8 misses the gate; none: report the miss
    max_layers: int = DEFAULT_MAX_LAYERS  # the budget: at most this many layers leave INT8
    sensitivity_images: int = DEFAULT_SENSITIVITY_IMAGES  # calibration crops each layer is measured on
    coarse_images: int = DEFAULT_COARSE_IMAGES  # first pass over every layer (>= sensitivity: one pass)
    refine_layers: int = DEFAULT_REFINE_LAYERS  # measured again on all sensitivity images

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"INT8 fallback {self.mode!r}; choose one of {', '.join(MODES)}")
        if min(self.max_layers, self.sensitivity_images, self.coarse_images, self.refine_layers) < 1:
            raise ValueError("the fallback budget, sensitivity images and refined layers must be at least 1")


@dataclass
class LayerSensitivity:
    layer: str
    op_type: str
    kl_divergence: float  # mean KL(FP32 || only-this-layer-INT8), calibration crops
    top1_agreement: float
    top5_overlap: float


@dataclass
class FallbackResult:
    layers: list[LayerSensitivity]  # kept in FP32, most harmful first
    ranking: list[LayerSensitivity]  # every INT8 layer, most harmful first
    tried: list[dict[str, Any]] = field(default_factory=list)  # gate figures per count tried
    gate: GateResult | None = None
    model: onnx.ModelProto | None = None

    @property
    def passed(self) -> bool:
        return self.gate is not None and self.gate.passed

    def recipe(self, settings: FallbackSettings) -> dict[str, Any]:
        """What the sidecar and precision_report.json record about the fallback."""
        return {
            "mode": settings.mode,
            "budget_layers": settings.max_layers,
            "sensitivity_images": settings.sensitivity_images,
            "coarse_images": settings.coarse_images,
            "refine_layers": settings.refine_layers,
            "fp32_layers": [
                {**asdict(s), "why": _why(s, rank, len(self.ranking))}
                for rank, s in enumerate(self.layers, start=1)
            ],
            "tried": self.tried,
            "passed": self.passed,
        }


def _why(sensitivity: LayerSensitivity, rank: int, total: int) -> str:
    return (
        f"INT8 missed the gate; this {sensitivity.op_type} ranked {rank} of {total} INT8 layers by the "
        f"damage it does alone in INT8 (KL {sensitivity.kl_divergence:.2e}, top-1 agreement "
        f"{sensitivity.top1_agreement:.3f}, top-5 overlap {sensitivity.top5_overlap:.3f} on calibration crops)"
    )


def int8_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes fed by a DequantizeLinear (the layers that run in INT8), in graph order."""
    dequantized = {
        out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output
    }
    return [
        node.name
        for node in model.graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and set(node.input) & dequantized
    ]


def fall_back(qdq: onnx.ModelProto, fp32: onnx.ModelProto, layers: Iterable[str]) -> onnx.ModelProto:
    """A copy of `qdq` in which `layers` read their FP32 inputs again (float activations, the original
    weights and biases, not corrected ones); unused Q/DQ nodes are dropped."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    wanted = set(layers)
    float_nodes = {node.name: node for node in fp32.graph.node if node.name in wanted}
    missing = wanted - set(float_nodes)
    if missing:
        raise ValueError(f"layers not in the FP32 graph: {sorted(missing)}")
    float_inits = {init.name: init for init in fp32.graph.initializer}
    present = {init.name for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    shadowed: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        original = float_nodes[node.name]
        for index, name in enumerate(node.input):
            producer = producers.get(name)
            dequantized = producer is not None and producer.op_type == "DequantizeLinear"
            # or a float initializer the quantizer's input had in its place (a corrected bias)
            replaced = name != original.input[index] and original.input[index] in float_inits
            if not dequantized and not replaced:
                continue
            node.input[index] = original.input[index]
            if original.input[index] in float_inits and original.input[index] not in present:
                model.graph.initializer.append(float_inits[original.input[index]])
                present.add(original.input[index])
                if (
                    dequantized and name == original.input[index]
                ):  # the quantizer named the DQ output after the
                    shadowed.append(producer)  # float initializer (an int32 bias): the initializer wins
    for producer in shadowed:
        model.graph.node.remove(producer)
    _prune(model)
    return model


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads."""
    graph_outputs = {value.name for value in model.graph.output}
    while True:
        used = {name for node in model.graph.node for name in node.input} | graph_outputs
        dead = [node for node in model.graph.node if not set(node.output) & used]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def mean_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    p = np.clip(reference.astype(np.float64), 1e-12, None)
    q = np.clip(candidate.astype(np.float64), 1e-12, None)
    return float(np.mean(np.sum(p * np.log(p / q), axis=1)))


def rank_layers(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    input_name: str,
    crops: np.ndarray,
    reference: np.ndarray,
    thresholds: GateThresholds,
    layers: list[str] | None = None,
) -> list[LayerSensitivity]:
    """Each INT8 layer (or each of `layers`) alone in INT8 against FP32 on `crops`; most harmful first."""
    every = int8_layers(qdq)
    layers = every if layers is None else layers
    op_types = {node.name: node.op_type for node in qdq.graph.node}
    ranking = []
    for layer in layers:
        alone = fall_back(qdq, fp32, [other for other in every if other != layer])
        probabilities = run_onnx(alone, input_name, crops)
        figures = compare(reference, probabilities, "int8", thresholds)
        ranking.append(
            LayerSensitivity(
                layer,
                op_types[layer],
                mean_kl(reference, probabilities),
                figures.top1_agreement,
                figures.top5_overlap,
            )
        )
    return sorted(ranking, key=lambda s: s.kl_divergence, reverse=True)


def rank_coarse_to_fine(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    input_name: str,
    calibration: np.ndarray,
    thresholds: GateThresholds,
    settings: FallbackSettings,
) -> list[LayerSensitivity]:
    """Every layer on `coarse_images` crops, then the `refine_layers` most harmful of them again on
    `sensitivity_images` crops, ahead of the rest in their coarse order. A layer's run costs about
    the same whatever it is, so this is n * coarse + refine * full crop-runs instead of n * full."""
    full = calibration[: settings.sensitivity_images]
    coarse = calibration[: settings.coarse_images]
    layers = int8_layers(qdq)
    if len(coarse) >= len(full) or settings.refine_layers >= len(layers):
        return rank_layers(qdq, fp32, input_name, full, run_onnx(fp32, input_name, full), thresholds)
    first = rank_layers(qdq, fp32, input_name, coarse, run_onnx(fp32, input_name, coarse), thresholds)
    chosen = [s.layer for s in first[: settings.refine_layers]]
    refined = rank_layers(qdq, fp32, input_name, full, run_onnx(fp32, input_name, full), thresholds, chosen)
    return refined + first[settings.refine_layers :]


def search_fallback(
    qdq: onnx.ModelProto,
    fp32: onnx.ModelProto,
    input_name: str,
    calibration: np.ndarray,
    gate: Callable[[onnx.ModelProto], GateResult],
    thresholds: GateThresholds,
    settings: FallbackSettings,
    echo: Callable[[str], None] = print,
    ranking: list[LayerSensitivity] | None = None,
) -> FallbackResult:
    """Keep the most harmful layers in FP32, one more at a time, until `gate` passes or the budget
    ends. `ranking`: a cached one (sensitivity.py); None measures it on the calibration crops."""
    if ranking is None:
        ranking = rank_coarse_to_fine(qdq, fp32, input_name, calibration, thresholds, settings)
    result = FallbackResult([], ranking)
    most = min(settings.max_layers, len(ranking) - 1)
    if most < 1:
        return result
    verdicts: dict[int, tuple[GateResult, Any]] = {}

    def passes(count: int) -> bool:
        if count not in verdicts:
            candidate = fall_back(qdq, fp32, [s.layer for s in ranking[:count]])
            verdict = gate(candidate)
            verdicts[count] = (verdict, candidate)
            result.tried.append({"fp32_layers": count, "top1_agreement": verdict.top1_agreement,
                                 "top5_overlap": verdict.top5_overlap, "mean_score_diff": verdict.mean_score_diff,
                                 "passed": verdict.passed})  # fmt: skip
            echo(
                f"{verdict.precision} fallback: {count} layer(s) in FP32 -> top-1 {verdict.top1_agreement:.4f}, "
                f"top-5 {verdict.top5_overlap:.4f}, mean diff {verdict.mean_score_diff:.5f}"
                + (" PASS" if verdict.passed else "")
            )
        return verdicts[count][0].passed

    # Agreement grows with the layers kept out of INT8 (most harmful first), so the fewest that pass
    # are found by doubling, then halving the gap: about 2 log2(n) gate runs instead of n.
    failed, count = 0, 1
    while count < most and not passes(count):
        failed, count = count, min(2 * count, most)
    if count >= most and not passes(most):
        best = most
    else:
        best = count
        while best - failed > 1:
            middle = (failed + best) // 2
            failed, best = (failed, middle) if passes(middle) else (middle, best)
    result.layers = ranking[:best]
    result.gate, result.model = verdicts[best]
    return result
