"""resnet-labeler runtime: preprocessing, runners, batching, the local pipeline and the Celery worker.

Heavy optional libraries (tensorrt, pycuda, torch) are imported lazily inside the modules that need
them, so a CPU worker with ONNX Runtime never imports them.
"""

__version__ = "0.1.0"
