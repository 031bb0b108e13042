"""`labeler run`: the whole pipeline in one process, no broker, into a resumable results file."""
