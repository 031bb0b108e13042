"""pycuda's real Python API as data, read from its source distribution (the version the
`tensorrt` extra pins), because the module itself cannot be built here.

pycuda is an sdist that compiles against a CUDA toolkit. On this machine its build fails twice
over (tried with 2026.1 and the machine's CUDA 13.0 toolkit): the toolkit has no `curand.h`
(`--no-cuda-enable-curand` gets past that) and no `libcuda.so`, not even the linker stub in
`lib64/stubs`, so `_driver.so` cannot be linked (`ld: cannot find -lcuda`): the driver library comes
with an NVIDIA driver, which a machine without a GPU does not have. Its Python names are defined in
`src/wrapper/*.cpp` (boost.python: `py::class_<...>("Stream")`, `.def("synchronize")`,
`.DEF_SIMPLE_METHOD(free)`, `.add_property("handle")`, `py::def("mem_alloc")`) and in
`pycuda/driver.py`; those are parsed here, per class.
"""

from __future__ import annotations

import importlib.util
import re
import tarfile
from pathlib import Path

from pinned_downloads import pip_download

_MEMBER = re.compile(
    r'\.(?:def|def_readonly|def_readwrite|add_property|add_static_property|staticmethod)\(\s*"(\w+)"'
    r"|\.DEF_SIMPLE_METHOD(?:_WITH_ARGS)?\((\w+)"
)
_FUNCTION = re.compile(r'py::def\(\s*"(\w+)"|DEF_SIMPLE_FUNCTION(?:_WITH_ARGS)?\((\w+)')


def download_sdist(dest: Path, version: str) -> Path:
    """The sdist. pip prepares an sdist's metadata even to download it; with pycuda's build
    requirements already here (setuptools, numpy) it skips installing a fresh build environment from
    the registry first (28 s -> 12 s on this machine). Without them, or if that fails, the usual way."""
    requirement, pattern = f"pycuda=={version}", "pycuda-*.tar.gz"
    if all(importlib.util.find_spec(module) for module in ("setuptools", "numpy")):
        try:
            return pip_download(dest, requirement, pattern, "--no-build-isolation")
        except AssertionError:
            pass  # e.g. a setuptools too old for this sdist: the isolated build below
    return pip_download(dest, requirement, pattern)


def driver_names(sdist: Path) -> dict[str, set[str]]:
    """{"pycuda.driver": module-level names, "<Class>": its methods and properties}."""
    names: dict[str, set[str]] = {"pycuda.driver": set()}
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            path = member.name.split("/", 1)[-1]
            if path.startswith("src/wrapper/") and path.endswith(".cpp"):
                _parse_wrapper(archive.extractfile(member).read().decode(), names)
            elif path == "pycuda/driver.py":
                source = archive.extractfile(member).read().decode()
                names["pycuda.driver"] |= set(re.findall(r"^(?:def|class) (\w+)", source, re.M))
                names["pycuda.driver"] |= set(re.findall(r"^(\w+) = ", source, re.M))
    return names


def _parse_wrapper(source: str, names: dict[str, set[str]]) -> None:
    """Each `py::class_<...>("Name", ...)` chain runs to the next `;`; what it defines is that class's."""
    position = 0
    for match in re.finditer(r'py::class_<[^;]*?>\s*\(\s*"(\w+)"', source):
        end = source.index(";", match.end())
        names["pycuda.driver"].add(match.group(1))
        members = names.setdefault(match.group(1), set())
        members.update(a or b for a, b in _MEMBER.findall(source[match.end() : end]))
        names["pycuda.driver"].update(a or b for a, b in _FUNCTION.findall(source[position : match.start()]))
        position = end
    names["pycuda.driver"].update(a or b for a, b in _FUNCTION.findall(source[position:]))
