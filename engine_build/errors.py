"""Build failures with messages that say what to do next."""


class BuildError(RuntimeError):
    """The bundle cannot be built as asked; the message names the fix."""
