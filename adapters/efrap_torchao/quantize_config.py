"""EFRAP as a torchao ``quantize_`` config, in the two steps torchao's own calibration-based configs take
(``GPTQConfig(step="observe" | "convert", base_config=...)``):

    config = EFRAPQuantizeConfig(base_config=Int8WeightOnlyConfig())
    quantize_(model, config)                       # observe: each selected layer records its inputs
    for batch in calib: model(batch)               # the user's calibration passes
    quantize_(model, config.converting())          # convert: learn each layer, write base_config's tensors
    plan = config.plan()                           # for verify_quantize and saving

``quantize_`` hands a config's handler one module at a time, so each layer learns alone, from the inputs
the float model fed it (``layer_inputs="float"``, as GPTQ's observe step), and is then quantized by the
base config's own handler. ``efrap_torchao.quantize_`` learns each layer on the partially quantized
model instead (the default elsewhere), which this form cannot see.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from efrap_plugin import (
    EFRAPConfig,
    EFRAPError,
    FoundLayers,
    Honours,
    LayerPlan,
    LayerProblem,
    ProducedPlan,
    RoundingPlan,
    TensorCalibration,
    run,
)
from efrap_plugin.held_out import HeldOut, inputs_needed
from efrap_plugin.plan import snap_weight

from .quantize import quantize_scheme

__all__ = ["EFRAPQuantizeConfig"]

log = logging.getLogger(__name__)

_RECORD = "_efrap_recorded_inputs"
_NAME = "layer"  # each layer's own plan; ``plan(model)`` names them


@dataclass
class EFRAPQuantizeConfig(AOBaseConfig):
    """``base_config`` (a config ``efrap_torchao.quantize_`` takes) with EFRAP's rounding, in two steps.

    ``step="observe"`` records, on each layer ``quantize_`` selects, the first ``inputs_needed(efrap)``
    input rows fed to it (a row: one image, or one token of a sequence); ``step="convert"`` learns each
    layer from them and quantizes it with ``base_config``'s own handler. The learned layers gather in the
    config: ``plan(model)`` is their plan, by the model's module names (``converting()`` keeps them
    shared).
    """

    base_config: Any = None
    step: str = "observe"
    efrap: EFRAPConfig = field(default_factory=EFRAPConfig)
    learned: list[tuple[weakref.ref, RoundingPlan]] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.step not in ("observe", "convert"):
            raise EFRAPError(f"EFRAPQuantizeConfig.step: expected 'observe' or 'convert', got {self.step!r}")
        quantize_scheme(self.base_config)  # a base config EFRAP cannot learn on is refused here
        if self.efrap.budget is not None:
            raise EFRAPError(
                "EFRAPQuantizeConfig: budget mode measures the whole model on held-out inputs, and this form "
                "learns one layer at a time; use efrap_torchao.quantize_(model, config, calib) for it"
            )
        if self.efrap.layer_inputs not in (None, "float"):
            raise EFRAPError(
                f"EFRAPQuantizeConfig: layer_inputs={self.efrap.layer_inputs!r}; this form sees each layer's "
                "inputs from the float model only ('float'); efrap_torchao.quantize_ learns on the partially "
                "quantized model"
            )

    def converting(self) -> EFRAPQuantizeConfig:
        """The same config at its convert step, sharing the learned layers."""
        converted = dataclasses.replace(self, step="convert")
        converted.learned = self.learned
        return converted

    def plan(self, model: nn.Module) -> RoundingPlan:
        """Every layer of ``model`` converted so far, as one plan keyed by module name (torchao gives a
        config's handler the module, not its name)."""
        names = {id(m): name for name, m in model.named_modules()}
        found = [(names.get(id(ref())), p) for ref, p in self.learned if ref() is not None]
        found = [(name, p) for name, p in found if name is not None]
        if not found:
            raise EFRAPError(
                "EFRAPQuantizeConfig.plan: no layer of this model converted yet; run "
                "quantize_(model, config.converting()) after the observe step and calibration"
            )
        layers = {name: p.layers[_NAME] for name, p in found}
        meta = dataclasses.replace(found[0][1].meta, calib_size=min(p.meta.calib_size for _, p in found))
        return RoundingPlan(found[0][1].scheme, layers, found[0][1].source, meta)


class _Observation:
    """The rows a layer was fed while observing, bounded."""

    def __init__(self, limit: int) -> None:
        self.rows: list[torch.Tensor] = []
        self.count, self.limit = 0, limit
        self.handle: Any = None

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self.count >= self.limit:
            return
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[: self.limit - self.count]
        self.rows.append(x.to(torch.float32).clone())
        self.count += x.shape[0]


class _RecordedLayerProducer(TensorCalibration):
    """One layer, its recorded inputs, float targets from its own weight."""

    source = "torchao"
    flow = "torchao-quantize_"
    honours = Honours(
        layer_inputs=("float",),
        units=("layer",),
        why_not={
            "layer_inputs": "each layer sees only the inputs the float model fed it",
            "unit": "a layer alone",
        },
    )

    def __init__(self, name: str, module: nn.Linear, scheme: Any) -> None:
        self.name, self.module, self.scheme = name, module, scheme

    def running(self) -> AbstractContextManager[None]:
        return nullcontext()

    def find_layers(self, calib: torch.Tensor, config: EFRAPConfig) -> FoundLayers:
        return FoundLayers([self.name])

    def _forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, None if self.module.bias is None else self.module.bias.detach().float())

    def float_outputs(self, calib: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._forward(calib, self.module.weight.detach().float())

    def problems(self, calib: torch.Tensor, config: EFRAPConfig) -> Iterator[LayerProblem]:
        weight = self.module.weight.detach().float().clone()
        yield LayerProblem(self.name, weight, self.scheme, self._forward, calib, self.float_outputs(calib))

    def held_out(self, held: torch.Tensor) -> HeldOut:  # pragma: no cover - budget mode refused
        raise EFRAPError("EFRAPQuantizeConfig: budget mode is not carried out by the per-layer form")

    def finish(self, learned: dict[str, LayerPlan]) -> ProducedPlan:
        return ProducedPlan(self.scheme, learned)


@register_quantize_module_handler(EFRAPQuantizeConfig)
def _efrap_quantize_transform(module: nn.Module, config: EFRAPQuantizeConfig, **kwargs: Any) -> nn.Module:
    if not isinstance(module, nn.Linear):
        raise EFRAPError(
            f"EFRAPQuantizeConfig: quantize_ selected a {type(module).__name__}; EFRAP learns Linear layers here "
            "(pass a filter_fn that selects them)"
        )
    if config.step == "observe":
        observation = _Observation(inputs_needed(config.efrap))
        observation.handle = module.register_forward_pre_hook(observation)
        setattr(module, _RECORD, observation)
        return module
    observation = getattr(module, _RECORD, None)
    if observation is None or not observation.rows:
        raise EFRAPError(
            "EFRAPQuantizeConfig: a layer reached the convert step with no inputs recorded; run "
            "quantize_(model, config) (step 'observe') and your calibration passes first"
        )
    observation.handle.remove()
    delattr(module, _RECORD)
    scheme, _ = quantize_scheme(config.base_config)
    producer = _RecordedLayerProducer(_NAME, module, scheme)
    plan = run(producer, torch.cat(observation.rows), config.efrap, progress=False)
    with torch.no_grad():
        snapped = snap_weight(module.weight.detach().float(), plan.layers[_NAME], scheme).to(
            module.weight.dtype
        )
        module.weight = nn.Parameter(snapped, requires_grad=False)
    from torchao.quantization import quantize_ as torchao_quantize_

    holder = nn.Sequential(module)
    torchao_quantize_(holder, config.base_config, filter_fn=lambda m, fqn: m is module)
    config.learned.append((weakref.ref(module), plan))
    return holder[0]
