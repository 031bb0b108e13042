"""The real TensorRT Python bindings as data: the names in `tensorrt_bindings/tensorrt.so` and its
`__init__.py`, from the `tensorrt-cu12-bindings` wheel of the version the `tensorrt` extra pins.

The module cannot be imported here (it links libnvinfer.so.11, which needs NVIDIA's own index and
a GPU), but pybind11 keeps every class, method, property and enum member name as a C string. The
linker merges a string into a longer one that ends with it ("Runtime" lives inside
"IPluginV3OneRuntime"), so a name counts as present when some string ends with it.
"""

from __future__ import annotations

import ast
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pinned_downloads import pip_download

WHEEL_PACKAGE = "tensorrt-cu12-bindings"


def download_wheel(dest: Path, version: str) -> Path:
    """The bindings wheel (1.3 MB); the same strings for every CPython build, so one platform and
    Python version is asked for explicitly."""
    options = ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")
    return pip_download(
        dest,
        f"{WHEEL_PACKAGE}=={version}",
        "tensorrt_cu12_bindings-*.whl",
        *options,
        "--implementation",
        "cp",
    )


@dataclass(frozen=True)
class RealBindings:
    version: str
    strings: frozenset[str]  # NUL-terminated strings of tensorrt.so
    python_names: frozenset[str]  # what the package's __init__.py defines itself

    @classmethod
    def from_wheel(cls, wheel: Path) -> RealBindings:
        with zipfile.ZipFile(wheel) as archive:
            binary = archive.read("tensorrt_bindings/tensorrt.so")
            init = archive.read("tensorrt_bindings/__init__.py").decode()
        strings = frozenset(s.decode("latin-1") for s in binary.split(b"\0") if s)
        version = re.search(r'__version__ = "([^"]+)"', init)
        return cls(version.group(1) if version else "", strings, frozenset(_defined_names(init)))

    def has(self, name: str) -> bool:
        """`name` is a string of the module or the tail of one (suffix-merged by the linker)."""
        return name in self.python_names or any(s.endswith(name) for s in self.strings)


def _defined_names(source: str) -> set[str]:
    """Top-level functions, classes and assignments of __init__.py (nptype, __version__, ...)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names
