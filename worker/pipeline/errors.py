"""Per-image failures: raised while reading or decoding one image, turned into its error record.

The codes themselves are part of the result contract and live with it (worker/records.py).
"""

from __future__ import annotations

from worker.records import ErrorCode


class ImageError(Exception):
    """A failure that belongs to one image, reported in its record instead of raised to the caller."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def unexpected_error(exc: Exception) -> ImageError:
    """An `internal_error` for a failure no check foresaw: the image gets a record (the caller logs
    the traceback), and one odd input never stops the pipeline."""
    return ImageError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
