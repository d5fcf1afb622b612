"""The one exception type that femtocc raises for problems a user can fix.

The CLI prints these as a single line (no traceback); everything else is a bug.
"""


class FemtoccError(Exception):
    """A user-facing error: bad input, missing package, unsupported construct."""
