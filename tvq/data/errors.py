"""The error type for data problems a user can fix."""


class DataError(RuntimeError):
    """Bad or missing input data; the message names the file or URL and the fix."""
