"""Reduced-precision models for a bundle: FP16 and INT8 (Q/DQ) ONNX, each gated against FP32.

TensorRT 11 builds strongly typed networks only, so precision lives in the ONNX itself: FP16 by
converting the graph (preprocessing head, softmax and graph I/O stay FP32), INT8 by explicit
QuantizeLinear/DequantizeLinear pairs computed from calibration crops made by the worker's own
decode_and_crop. Every variant is compared with FP32 on held-out images before it is recorded.
Modules: fp16, int8, calibration, gate, variants (the orchestration), cli_options (`labeler build`).
"""
