"""The one exception class of rapt-reg."""


class RaptRegError(ValueError):
    """Raised for every misuse rapt-reg detects; the message says what was wrong and the fix.

    It subclasses ``ValueError``, so ``except ValueError`` catches it too.
    """
