"""The root of cdm's own exceptions: `except cdm.CdmError` catches the errors cdm raises on purpose (option values,
bad inputs, damaged stores, a diverged run), while each class keeps its builtin base (ValueError, TypeError ...).
Checks deep inside (a malformed array handed to a pure function) may still raise plain ValueError/TypeError."""


class CdmError(Exception):
    """Base class of every exception cdm raises deliberately; its message says what to change."""


class OptionError(CdmError, ValueError):
    """An option's value cannot work (a count below 1, an unknown name, flags that contradict each other); the
    message names the flag. A ValueError too, so callers that caught ValueError keep working."""
