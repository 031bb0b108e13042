"""The `labeler` command line. Each subcommand is also `python -m worker SUBCOMMAND`.

The only package that may import everything, engine_build included: it resolves the default
bundle and hands the runtime (pipeline, runners, local run, Celery worker) a path.
"""

from __future__ import annotations

import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail to stderr.")
@click.version_option(package_name="resnet-labeler")
def main(verbose: bool) -> None:
    """Label images with a trained ResNet-50: locally, or over Celery and Redis on many GPUs."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# Subcommands that live with the code they drive: each module defines one click command (or a
# list of them) and is registered here, so `labeler --help` shows them all.
_COMMAND_MODULES = (
    "worker.cli.run",
    "engine_build.cli_build",
    "worker.cli.worker",
    "worker.cli.runs",
    "worker.cli.report",
    "engine_build.cli_finetune",
)


def _register_commands() -> None:
    import importlib

    for module_name in _COMMAND_MODULES:
        module = importlib.import_module(module_name)
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
