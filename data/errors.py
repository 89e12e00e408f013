"""The one exception type the data pipeline raises for bad input or bad configuration.

Its message is a single line naming the bad value (a file:line, a config key, a path), so the
CLI can print it as `error: ...` and exit 2 instead of showing a traceback.
"""


class DataError(Exception):
    """Bad data or bad data configuration; the message names what is wrong and where."""
