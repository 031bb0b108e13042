"""One PyTorch thread for the tests' small models: two threads on two shared cores are slower.

Measured on this workplace's 2-core machine with other jobs running: training the Keras ResNet50 on
32x32 shapes took 3 s per step with PyTorch's default two threads and 0.9 s with one (the whole
session fixture 6 minutes against 80 s). At these sizes each operation is too small to split, and
a second thread that waits for a busy core stalls every operation. The product keeps PyTorch's
default; only the tests pin it, and only while they run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """PyTorch's intra-op threads set to 1 inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
