"""Where the defense's work runs: a device name checked before any work."""

from __future__ import annotations

import torch

from .errors import EFRAPError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device named by ``device``, or a clear error when this machine has none."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError) as exc:
        raise EFRAPError(
            f"device: {str(device)!r} is not usable here ({exc}); pass 'cpu' or an available accelerator"
        ) from None
    if dev.type == "meta":
        raise EFRAPError(
            "device: 'meta' holds no values to learn from; pass 'cpu' or an available accelerator"
        )
    return dev
