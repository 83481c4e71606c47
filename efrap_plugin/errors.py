"""Errors raised at the library's boundaries.

Every message names the argument, what was expected, what arrived, and the fix, so that users never
have to read a traceback from deep inside torch.
"""

from __future__ import annotations

__all__ = ["EFRAPError", "DataError", "ModelError", "PlanMismatchError"]


class EFRAPError(ValueError):
    """Base class: a user-facing problem with the arguments or files given to efrap-plugin."""


class DataError(EFRAPError):
    """Calibration or evaluation data of the wrong shape, dtype, size or label range."""


class ModelError(EFRAPError):
    """A model the defense cannot work on (no quantizable layer, NaN weights, unreadable file)."""


class PlanMismatchError(EFRAPError):
    """A RoundingPlan applied to a model other than the one it was made from."""
