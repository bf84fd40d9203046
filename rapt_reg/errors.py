"""The one exception class of rapt-reg."""


class RaptRegError(ValueError):
    """Raised for every misuse rapt-reg detects, saying what was wrong and the fix."""
