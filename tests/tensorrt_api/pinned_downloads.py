"""The versions the `tensorrt` extra pins, and pip downloads of them from the package registry."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pinned_version(package: str) -> str:
    """X in pyproject's `tensorrt` extra entry `package==X`: the version our code is checked against."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for requirement in extras["tensorrt"]:
        match = re.fullmatch(rf"{re.escape(package)}==([\w.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject's tensorrt extra does not pin {package}==<version>")


def pip_download(dest: Path, requirement: str, pattern: str, *options: str) -> Path:
    """`pip download --no-deps` into `dest`; the one file matching `pattern`, or a clear failure."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *options,
        "--dest",
        str(dest),
        requirement,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    found = sorted(dest.glob(pattern))
    if done.returncode != 0 or not found:
        raise AssertionError(f"pip download {requirement} failed:\n{done.stdout}\n{done.stderr}")
    return found[0]


def missing(wanted: dict[str, list[str] | set[str]], present) -> list[str]:
    """`owner.name` for each wanted name that `present(owner, name)` says is absent."""
    return [
        f"{owner}.{name}" for owner, names in wanted.items() for name in names if not present(owner, name)
    ]
