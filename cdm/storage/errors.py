"""The storage layer's error (its own module, so that every storage module can raise it without import cycles)."""

from cdm.errors import CdmError


class StoreError(CdmError):
    """A store is missing, of another kind or version, inconsistent, or refuses a write."""
