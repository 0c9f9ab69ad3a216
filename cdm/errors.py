"""The root of cdm's own exceptions: `except cdm.CdmError` catches every error cdm raises on purpose (bad options,
bad inputs, damaged stores, a diverged run), while each class keeps its builtin base (ValueError, TypeError ...)."""


class CdmError(Exception):
    """Base class of every exception cdm raises deliberately; its message says what to change."""
