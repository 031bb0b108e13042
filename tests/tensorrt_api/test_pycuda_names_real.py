"""The pycuda calls of the TensorRT runner and its loaders, and the fake pycuda, against the REAL
pycuda API of the pinned version, read from its sdist (pycuda cannot be built here: see
real_pycuda.py for why).

What this proves: every pycuda.driver function, class, method and property the runner and its
loaders use exists on the class we use it on, and the fake offers nothing pycuda lacks. What it
cannot prove: argument types or anything CUDA does.
"""

from __future__ import annotations

import re
import sys

import pytest
from pinned_downloads import ROOT, missing, pinned_version
from real_pycuda import download_sdist, driver_names

sys.path.insert(0, str(ROOT / "tests" / "tensorrt_fake"))
from fake_gpu_modules import FakeGpuWorld, fake_pycuda_names, make_fake_modules  # noqa: E402

SOURCES = (
    ROOT / "worker" / "runners" / "tensorrt_loader.py",
    ROOT / "worker" / "runners" / "tensorrt_runner.py",
)

USED = {
    "pycuda.driver": [
        "init",
        "Device",
        "Stream",
        "pagelocked_empty",
        "mem_alloc",
        "memcpy_htod_async",
        "memcpy_dtoh_async",
    ],
    "Device": ["name", "compute_capability", "make_context"],
    "Context": ["pop"],  # CudaContext.cuda_context, made by Device.make_context
    "Stream": ["synchronize", "handle"],
    "DeviceAllocation": ["free", "__int__"],  # mem_alloc's result; int(buffer) is its device address
}


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, set[str]]:
    names = driver_names(download_sdist(tmp_path_factory.mktemp("pycuda_sdist"), pinned_version("pycuda")))
    assert len(names["pycuda.driver"]) > 50 and "Stream" in names
    return names


def test_every_pycuda_name_the_runner_uses_is_on_that_class_in_real_pycuda(real):
    absent = missing(USED, lambda owner, name: name in real.get(owner, ()))
    assert not absent, f"not in pycuda {pinned_version('pycuda')}: {absent}"


def test_the_used_list_matches_the_runner():
    text = "\n".join(path.read_text() for path in SOURCES)
    listed = {name for names in USED.values() for name in names} - {"__int__"}
    unused = sorted(name for name in listed if not re.search(rf"\.{name}\b", text))
    assert not unused, f"listed but not used by {[path.name for path in SOURCES]}: {unused}"
    called = set(re.findall(r"\bcuda\.(\w+)", text))
    assert called <= set(USED["pycuda.driver"]), f"pycuda.driver names used but not listed: {called}"


def test_the_fake_pycuda_offers_only_what_real_pycuda_has(real):
    fake = fake_pycuda_names(make_fake_modules(FakeGpuWorld())["pycuda.driver"])
    extra = missing(fake, lambda owner, name: name in real.get(owner, ()))
    assert not extra, f"the fake offers what pycuda {pinned_version('pycuda')} lacks: {extra}"
    assert set(fake) == set(USED)  # the fake models exactly the classes the runner touches
