"""Which bundle a command serves: the one named, or the embedded default (built on first use).

Resolving the default needs engine_build (it may build a ResNet-50 bundle from weights), so it
happens here, on the command line, and the runtime packages only ever receive a path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click


def resolve_bundle(model_dir: Path | None, echo: Callable[[str], None] | None = None) -> Path:
    """`model_dir`, or the embedded default bundle; a ClickException when it cannot be built."""
    if model_dir is not None:
        return Path(model_dir)
    from engine_build.default_bundle import ensure_default_bundle
    from engine_build.errors import BuildError

    try:
        return ensure_default_bundle(echo=echo or (lambda message: click.echo(message, err=True)))
    except BuildError as exc:
        raise click.ClickException(str(exc)) from None
