"""Building model bundles: loaders that turn weights or an ONNX file into a bundle directory.

engine_build holds the "how to get it" side (loaders, export, graph surgery, precision, engines);
worker holds the "how to run it" side. torch is imported lazily: only PyTorch sources need it.
"""
