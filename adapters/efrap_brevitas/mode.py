"""``efrap_mode``: EFRAP as a Brevitas algorithm context, beside ``calibration_mode``.

Brevitas' own post-training algorithms are contexts the user's calibration loop runs inside
(``calibration_mode``, ``bias_correction_mode``, ``gptq_mode``). EFRAP follows that form rather than a
quantizer that learns behind the user's back at its first forward pass: the context records the inputs
the user's loop feeds the model, and on leaving it learns every layer's rounding from them and installs
it as the quantizers' rounding, so evaluation and ``export_onnx_qcdq`` give the plan's integers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from efrap_plugin import EFRAPConfig, EFRAPError, RoundingPlan
from efrap_plugin.held_out import inputs_needed

from .defend import _quant_wbiol, defend_quant_model

__all__ = ["efrap_mode"]

log = logging.getLogger(__name__)


class efrap_mode:  # noqa: N801  (a context named as Brevitas names its own: calibration_mode, gptq_mode)
    """Record the calibration inputs run through ``model`` inside the block; on leaving it, defend.

    ``with torch.no_grad(), efrap_mode(qmodel) as efrap, calibration_mode(qmodel):`` around the user's
    calibration loop: ``calibration_mode`` leaves first (its statistics final), then EFRAP learns from
    the same inputs (``config.calib_size``, and budget mode's held-out ones, are kept; the rest pass
    through untouched). ``efrap.plan`` is the RoundingPlan afterwards. A block that raises leaves the
    model as it was.
    """

    def __init__(self, model: nn.Module, config: EFRAPConfig | None = None, *, progress: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise EFRAPError(f"efrap_mode: expected a Brevitas nn.Module, got {type(model).__name__}")
        self.model, self.config, self.progress = model, config or EFRAPConfig(), progress
        self.plan: RoundingPlan | None = None
        self._rows: list[torch.Tensor] = []
        self._kept = 0
        self._hook = None

    def __enter__(self) -> efrap_mode:
        wanted = inputs_needed(self.config)

        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._kept < wanted and args and isinstance(args[0], torch.Tensor):
                rows = args[0].detach()[: wanted - self._kept].to("cpu", copy=True)
                self._rows.append(rows)
                self._kept += rows.shape[0]

        self._hook = self.model.register_forward_pre_hook(record)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._hook.remove()
        rows, self._rows = self._rows, []
        if exc_type is not None:
            return
        if not rows:
            raise EFRAPError(
                "efrap_mode: no input went through the model inside the block; run your calibration batches "
                "through it there (with efrap_mode(model), calibration_mode(model): for x in calib: model(x))"
            )
        _check_calibration_finished(self.model)
        self.plan = defend_quant_model(self.model, torch.cat(rows), self.config, progress=self.progress)


def _check_calibration_finished(model: nn.Module) -> None:
    """Refuse to learn while ``calibration_mode`` still has the model's quantizers off (efrap_mode left
    inside it): the grids are not final, and no weight quantizer is on to read them from."""
    layers = [m for m in model.modules() if isinstance(m, _quant_wbiol())]
    if layers and not any(getattr(m.weight_quant, "is_quant_enabled", False) for m in layers):
        raise EFRAPError(
            "efrap_mode: left while the model's weight quantizers are off (inside calibration_mode?); open "
            "efrap_mode first so that calibration_mode closes before it: "
            "`with efrap_mode(model) as efrap, calibration_mode(model):`"
        )
