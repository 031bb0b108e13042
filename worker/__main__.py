"""`python -m worker SUBCOMMAND ...` is the same as `labeler SUBCOMMAND ...`."""

from worker.cli import main

main(prog_name="labeler")
