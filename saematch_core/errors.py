"""Exception types raised by saematch.

Bad *values* raise :class:`ValueError` subclasses, bad *types* :class:`TypeError`, missing files
:class:`FileNotFoundError`. Every message starts with the file, parameter or field at fault and
says what was expected and what was found.
"""

from __future__ import annotations

__all__ = ["DamagedFileError", "InfeasibleMatchError", "SAEFormatError", "SAEValidationError"]


class SAEValidationError(ValueError):
    """An SAE's tensors are inconsistent: wrong shape, non-finite values, bad threshold, ..."""


class SAEFormatError(ValueError):
    """A file could not be read as an SAE: unknown format, missing key, corrupt or truncated data."""


class InfeasibleMatchError(ValueError):
    """No assignment covers every feature of the smaller side (e.g. a sparse graph without one)."""


class DamagedFileError(ValueError):
    """A stored file does not hold what was written: truncated, resized, or its content changed."""
