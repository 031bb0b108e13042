"""Stable error codes for per-image failures.

Every input gets exactly one record; a bad input gets an error record with one of these codes and
never stops a batch, a worker or a run. The codes are part of the result contract: never rename one.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    NOT_A_FILE = "not_a_file"
    TOO_LARGE = "too_large"
    DECODE_FAILED = "decode_failed"
    OUTSIDE_ALLOWED_ROOTS = "outside_allowed_roots"
    INFERENCE_FAILED = "inference_failed"
    INTERNAL_ERROR = "internal_error"


class ImageError(Exception):
    """A failure that belongs to one image, reported in its record instead of raised to the caller."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def as_record_error(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}
