"""The run's contract: its shards, its result dataset, and what a finished run leaves behind."""
