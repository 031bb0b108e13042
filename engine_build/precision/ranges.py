"""Activation ranges for symmetric INT8, computed by us from calibration crops: minmax, entropy, percentile.

ONNX Runtime's own calibrators cannot be configured through quantize_static, and its entropy one
is a no-op there: with its defaults (128 histogram bins, 128 quantized bins) the KL search has a
single candidate threshold, the full range, so it always returned minmax's ranges (same scales,
byte-identical model). So the ranges are computed here, the way TensorRT's calibrators do, on a
histogram of |x| per tensor (symmetric quantization only needs amax):
- minmax: the largest |x| seen;
- entropy: the threshold whose 128-level quantized distribution is closest (KL divergence) to the
  clipped one, searched from 128 bins up over 2048+ bins (TensorRT's entropy calibration), among
  thresholds that clip at most 1% of the values;
- percentile: the 99.99th percentile of |x|.
The ranges are then handed to ONNX Runtime's Q/DQ writer as tensor overrides (int8.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from engine_build.precision.graph_parts import probe_session

METHODS = ("minmax", "entropy", "percentile")
HISTOGRAM_BINS = 2048
QUANTIZED_BINS = 128  # 2**7 levels on each side of zero for signed INT8
PERCENTILE = 99.99
MAX_CLIPPED = 0.01  # entropy: share of values a threshold may clip at most
RANGE_BATCH = 8  # crops per run of the augmented model: every quantized input is an output


@dataclass
class AbsHistogram:
    """Histogram of |x| with a fixed bin width, grown when a later batch exceeds it."""

    width: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    amax: float = 0.0
    low: float = 0.0  # smallest and largest signed value seen: the asymmetric (uint8) form's range
    high: float = 0.0

    def add(self, values: np.ndarray) -> None:
        flat = values.ravel().astype(np.float32, copy=False)
        if flat.size == 0:
            return
        self.low, self.high = min(self.low, float(flat.min())), max(self.high, float(flat.max()))
        magnitudes = np.abs(flat)
        top = float(magnitudes.max())
        self.amax = max(self.amax, top)
        if self.width == 0.0:
            if top == 0.0:  # all zeros so far: nothing to size the bins by; they go in bin 0
                self.counts = np.array([self.counts.sum() + magnitudes.size], np.int64)
                return
            self.width = top / HISTOGRAM_BINS
        index = (magnitudes / self.width).astype(np.int64)
        grown = np.bincount(index, minlength=max(len(self.counts), int(index.max()) + 1))
        grown[: len(self.counts)] += self.counts
        self.counts = grown


def amax_minmax(hist: AbsHistogram) -> float:
    return hist.amax


def amax_percentile(hist: AbsHistogram, percentile: float = PERCENTILE) -> float:
    if hist.width == 0.0:
        return hist.amax
    cdf = np.cumsum(hist.counts) / hist.counts.sum()
    index = int(np.searchsorted(cdf, percentile / 100.0))
    return min(hist.amax, (index + 1) * hist.width)


def amax_entropy(hist: AbsHistogram, start_bin: int = QUANTIZED_BINS) -> float:
    """TensorRT's KL-divergence threshold search (as in NVIDIA's pytorch-quantization), vectorized."""
    if hist.width == 0.0 or len(hist.counts) <= start_bin:
        return hist.amax
    bins = hist.counts.astype(np.float64)
    bins[0] = bins[1]  # the zero bin (ReLU outputs) would dominate every distribution
    # Clipping almost everything makes both distributions one spike in the last bin (KL 0): never
    # consider thresholds that clip more than MAX_CLIPPED of the values.
    above = bins.sum() - np.cumsum(bins)
    best_index, best_divergence = len(bins), np.inf
    for stop in range(start_bin, len(bins) + 1):
        if above[stop - 1] > MAX_CLIPPED * bins.sum():
            continue
        reference = bins[:stop].copy()
        reference[-1] += bins[stop:].sum()  # clipped values land in the last bin
        group = np.minimum((np.arange(stop) * QUANTIZED_BINS) // stop, QUANTIZED_BINS - 1)
        nonzero = bins[:stop] != 0
        group_sum = np.bincount(group, weights=bins[:stop], minlength=QUANTIZED_BINS)
        group_nonzero = np.bincount(group, weights=nonzero, minlength=QUANTIZED_BINS)
        candidate = np.where(nonzero, group_sum[group] / np.maximum(group_nonzero[group], 1), 0.0)
        divergence = _kl(reference, candidate)
        if divergence <= best_divergence:  # ties: the wider range, as TensorRT does
            best_index, best_divergence = stop, divergence
    return min(hist.amax, best_index * hist.width)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return np.inf
    p, q = p / p_sum, q / q_sum
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


AMAX = {"minmax": amax_minmax, "entropy": amax_entropy, "percentile": amax_percentile}


def collect_histograms(
    model: onnx.ModelProto, tensors: Iterable[str], input_name: str, batches: Iterable[np.ndarray]
) -> dict[str, AbsHistogram]:
    """Run the FP32 model with `tensors` as extra outputs over the batches; one |x| histogram each."""
    session, names = probe_session(model, tensors)
    histograms = {name: AbsHistogram() for name in names}
    for batch in batches:
        for name, value in zip(names, session.run(names, {input_name: batch}), strict=True):
            histograms[name].add(value)
    return histograms


def activation_ranges(
    model_path: Path, tensors: Iterable[str], input_name: str, crops: np.ndarray, method: str
) -> dict[str, float]:
    """amax per tensor by `method` from the calibration crops (uint8, the bundle's input)."""
    histograms = _histograms(model_path, tensors, input_name, crops, method)
    return {name: float(AMAX[method](hist)) for name, hist in histograms.items()}


def _histograms(
    model_path: Path, tensors: Iterable[str], input_name: str, crops: np.ndarray, method: str
) -> dict[str, AbsHistogram]:
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}; choose one of {', '.join(METHODS)}")
    model = onnx.load(str(model_path))
    batches = (crops[i : i + RANGE_BATCH] for i in range(0, len(crops), RANGE_BATCH))
    return collect_histograms(model, tensors, input_name, batches)


def activation_intervals(
    model_path: Path, tensors: Iterable[str], input_name: str, crops: np.ndarray, method: str
) -> dict[str, tuple[float, float]]:
    """(rmin, rmax) per tensor for asymmetric uint8 (the CPU form): the same `method` threshold as
    the symmetric ranges above (the TensorRT variant's), tightened to the signed values seen, so a
    ReLU output spends all 256 levels on [0, amax] instead of half of them on negatives it never has.
    Both always include 0, as ONNX Runtime's quantizer requires."""
    intervals = {}
    for name, hist in _histograms(model_path, tensors, input_name, crops, method).items():
        amax = float(AMAX[method](hist))
        intervals[name] = (max(hist.low, -amax), min(hist.high, amax))
    return intervals
