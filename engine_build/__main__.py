"""`python -m engine_build ...` is the same as `labeler build ...`."""

from worker.cli import build

build(prog_name="labeler build")
