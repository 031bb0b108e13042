"""`python -m engine_build ...` is the same as `labeler build ...`."""

from engine_build.cli_build import build

build(prog_name="labeler build")
