"""Incremental runs: label only what earlier datasets have not (`--skip-done-in DIR_OR_URL`).

An input is skipped when an earlier dataset of the chain has its row labeled by the same model
checksum and precision, from the same version of its source (worker/sources/version.py). The
decision compares 128-bit digests of (path, version) against a sorted array built from the earlier
rows one batch at a time (worker/delta/done_index.py), so 10 M earlier rows cost ~160 MB, not
10 M Python strings. The new dataset holds only the new rows; its manifest's `lineage` names the
datasets it built on (worker/delta/lineage.py), and `labeler results` reads the chain as one table,
newest row per path winning (worker/delta/union.py).
"""
