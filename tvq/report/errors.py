"""The error type for result files that the report cannot use."""


class ReportError(RuntimeError):
    """A missing or malformed result file, or a failed notebook; the message names the file."""
