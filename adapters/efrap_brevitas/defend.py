"""EFRAP on the user's own Brevitas model: one call after their ``calibration_mode`` pass.

Every QuantConv / QuantConvTranspose / QuantLinear whose weight quantizer gives integers becomes a
LayerProblem for the core's one per-layer loop. The grid is read from the layer's own quantizer
(``quant_weight()``: scale, zero point, bit width, signedness; the proxy's narrow range), never chosen
here. Inputs mix, element by element, the model with quantization on and every earlier layer's learned
rounding in (the reference's partially quantized model) and the model with quantization off
(``layer_inputs``, see efrap_plugin.layer_inputs); targets always come with quantization off. The
learned integers go in as the quantizer's ``float_to_int_impl`` (see rounding.py): weights, scales and
quantizers stay the user's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from efrap_plugin import (
    LayerPlan,
    QuantScheme,
    RoundingPlan,
    capture,
    execution_order,
    fingerprint,
    grid_record,
    on_device_of,
    pick_layer_inputs,
)
from efrap_plugin.config import EFRAPConfig, LayerInputs
from efrap_plugin.defense import run, with_layer_inputs
from efrap_plugin.errors import EFRAPError, ModelError
from efrap_plugin.held_out import HeldOut, first_outputs
from efrap_plugin.producer import FoundLayers, Honours, LayerProblem, ProducedPlan, TensorCalibration

from .grid import LayerGrid, layer_grid
from .rounding import _int_quant, install_rounding, rounding_of

__all__ = ["BrevitasProducer", "apply_plan", "defend_quant_model", "quant_layers"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _restored_on_failure(layers: dict[str, nn.Module]) -> Iterator[None]:
    """Each layer's rounding as it was, should the block fail: a failed defense leaves the user's model
    as it found it, not half-defended."""
    before = {}
    for name, layer in layers.items():
        int_quant = _int_quant(layer)
        rounding = rounding_of(layer)
        before[name] = (
            int_quant,
            int_quant.float_to_int_impl,
            None if rounding is None else rounding.integers,
        )
    try:
        yield
    except BaseException:
        for int_quant, impl, integers in before.values():
            int_quant.float_to_int_impl = impl
            if integers is not None:
                impl.integers = integers
        raise


def quant_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers EFRAP defends, by name, and every other weight-quantized layer with the reason."""
    wbiol = _quant_wbiol()
    layers, skipped = {}, {}
    for name, module in model.named_modules():
        quant = getattr(module, "weight_quant", None)
        if not getattr(quant, "is_quant_enabled", False):
            continue
        if not isinstance(module, wbiol):  # QuantEmbedding: a table looked up, no layer output to preserve
            skipped[name] = f"{type(module).__name__}: not a Conv / Linear layer EFRAP learns"
            continue
        try:
            layer_grid(module, name)
        except EFRAPError as exc:
            skipped[name] = str(exc).split(": ", 1)[1]
            continue
        if _int_quant(module) is None:  # a decoupled or custom quantizer that rounds elsewhere
            skipped[name] = (
                f"its weight quantizer ({type(module.weight_quant.tensor_quant).__name__}) has no integer "
                "rounding step (float_to_int_impl) EFRAP can set"
            )
            continue
        layers[name] = module
    return layers, skipped


def _quant_wbiol() -> type:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return QuantWeightBiasInputOutputLayer


def _float_mode(model: nn.Module) -> Any:
    """Brevitas' own switch: every quantizer off (and QuantTensors off), restored on exit."""
    from brevitas.graph.calibrate import quantization_status_manager

    return quantization_status_manager(
        model, disable_act_quant=True, disable_weight_quant=True, disable_bias_quant=True, is_training=False
    )


def _float_forward(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    """The model with quantization off: the float model budget mode compares with."""

    def forward(x: torch.Tensor) -> Any:
        with _float_mode(model):
            return model(x)

    return forward


def _problems(
    model: nn.Module,
    layers: dict[str, nn.Module],
    grids: dict[str, LayerGrid],
    calib: torch.Tensor,
    choice: str,
    seed: int,
) -> Iterator[LayerProblem]:
    """One problem per layer of ``grids`` (in execution order). A layer's input is what its input
    quantizer hands it (the quantized input when quantization is on)."""
    generator = torch.Generator().manual_seed(seed)
    for name, grid in grids.items():
        layer = layers[name]
        with _float_mode(model):
            targets = capture(model, layer, calib, "output")

        def inputs_of(kind, layer=layer):
            if kind == "quantized":
                return capture(model, layer.input_quant, calib, "output")
            with _float_mode(model):
                return capture(model, layer.input_quant, calib, "output")

        inputs = pick_layer_inputs(choice, inputs_of, generator)
        axis = grid.axis
        bias = layer.bias.detach().clone() if layer.bias is not None else None

        def forward(x, w, layer=layer, bias=bias, axis=axis):
            return layer.inner_forward_impl(x, w.movedim(0, axis), on_device_of(bias, x))

        def install(integers, layer=layer, axis=axis):
            install_rounding(layer, integers.movedim(0, axis))

        weight = layer.weight.detach().movedim(axis, 0).contiguous()
        yield LayerProblem(
            name, weight, grid.scheme, forward, inputs, targets, grid.scale, grid.zero_point, install
        )
        del inputs, targets  # before the next layer's capture: one layer's activations held at a time


class BrevitasProducer(TensorCalibration):
    """``defend_quant_model``'s producer: the user's own Brevitas model, its quantizers on for the
    partially quantized model and off (Brevitas' own switch) for the float one; the learned integers go
    in as each weight quantizer's rounding step, in place."""

    source = "brevitas"
    flow = "brevitas"
    honours = Honours(
        layer_inputs=("mixed", "quantized", "float"),
        units=("layer",),
        why_not={
            "unit": "a Brevitas activation is a quantized module of its own (QuantReLU) with its own "
            "output quantizer, so each layer's own output is what its rounding preserves"
        },
    )

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise EFRAPError(f"model: expected a Brevitas nn.Module, got {type(model).__name__}")
        self.model = model
        self.layers, self.skipped = quant_layers(model)
        if not self.layers:
            reasons = f" ({self.skipped})" if self.skipped else ""
            raise ModelError(
                f"model: no brevitas.nn QuantConv / QuantConvTranspose / QuantLinear with an integer weight "
                f"quantizer in {type(model).__name__}{reasons}; build the model from brevitas.nn layers (or "
                "brevitas.graph.quantize) and calibrate it before defend_quant_model"
            )
        self.grids: dict[str, LayerGrid] = {}

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Eval mode for the defense (the user's mode restored after); a failure takes back every
        rounding installed."""
        was_training = self.model.training
        self.model.eval()
        try:
            with _restored_on_failure(self.layers):
                yield
        finally:
            self.model.train(was_training)

    def find_layers(self, calib: torch.Tensor, config: EFRAPConfig) -> FoundLayers:
        order = execution_order(self.model, self.layers, calib[:1])
        if not order:
            raise ModelError(
                f"model: none of its quantized layers ({', '.join(self.layers)}) ran in a forward pass of the "
                "calibration data; pass inputs the model's forward uses"
            )
        never = {name: "never called in a forward pass" for name in self.layers if name not in order}
        self.grids = {name: layer_grid(self.layers[name], name) for name in order}
        return FoundLayers(order, {**self.skipped, **never})

    def float_outputs(self, calib: torch.Tensor) -> torch.Tensor:
        return first_outputs(_float_forward(self.model), calib)

    def problems(self, calib: torch.Tensor, config: EFRAPConfig) -> Iterator[LayerProblem]:
        return _problems(self.model, self.layers, self.grids, calib, config.layer_inputs, config.seed)

    def held_out(self, held: torch.Tensor) -> HeldOut:
        """The model's outputs with quantization off, and with it on (its quantizers' own rounding, the
        learned layers' so far)."""
        return HeldOut.of_models(_float_forward(self.model), self.model, held)

    def finish(self, learned: dict[str, LayerPlan]) -> ProducedPlan:
        """Integers in each weight's own layout; each layer's grid, read from its quantizer."""
        layers = {
            name: lp.in_weight_layout(self.layers[name].weight, self.grids[name].axis)
            for name, lp in learned.items()
        }
        grids = {name: grid_record(self.grids[name].scheme, axis=self.grids[name].axis) for name in learned}
        first = self.grids[next(iter(learned))].scheme if learned else QuantScheme.brevitas()
        return ProducedPlan(first, layers, grids)


def defend_quant_model(
    model: nn.Module,
    calib_data: Any,
    config: EFRAPConfig | None = None,
    *,
    layer_inputs: LayerInputs | None = None,
    progress: bool = True,
) -> RoundingPlan:
    """EFRAP on a Brevitas model the user built (``brevitas.nn`` layers, or ``preprocess_for_quantize``
    + ``quantize`` / ``layerwise_quantize``) and calibrated with their own quantizers.

    Learns each weight's rounding on the grid its quantizer defines and installs it as that quantizer's
    ``float_to_int_impl`` (in place: the model is the user's PTQ model, as after ``calibration_mode``),
    so ``quant_weight()``, evaluation and ``export_onnx_qcdq`` give the returned plan's integers. Plan
    integers are in each weight's own layout; ``plan.meta.grids`` holds each layer's grid.
    ``layer_inputs`` (shorthand for ``config.layer_inputs``): "mixed" (the default), "quantized" (the
    reference) or "float": measured in benchmarks/results/layer-inputs.md.
    """
    return run(
        BrevitasProducer(model), calib_data, with_layer_inputs(config, layer_inputs), progress=progress
    )


def apply_plan(model: nn.Module, plan: RoundingPlan) -> nn.Module:
    """Reinstall a saved plan's rounding on the same Brevitas model (say, rebuilt and reloaded):
    every planned layer must be there, with the weights the plan was learned on."""
    layers, _ = quant_layers(model)
    for name, lp in plan.layers.items():
        layer = layers.get(name)
        if layer is None:
            raise EFRAPError(
                f"plan: layer {name!r} is not an integer-quantized Brevitas layer of this model; "
                "apply the plan to the model it was learned on"
            )
        if fingerprint(layer.weight.detach()) != lp.fingerprint:
            raise EFRAPError(
                f"plan: layer {name!r} holds other weights than the plan was learned on; "
                "load the same weights, or defend this model again"
            )
        planned = plan.meta.grids.get(name) or {"qmin": plan.scheme.qmin, "qmax": plan.scheme.qmax}
        held = layer_grid(layer, name).scheme
        if (held.qmin, held.qmax) != (int(planned["qmin"]), int(planned["qmax"])):
            raise EFRAPError(
                f"plan: layer {name!r} rounds to [{held.qmin}, {held.qmax}] with this model's quantizer, and the "
                f"plan was learned on [{planned['qmin']}, {planned['qmax']}]; apply it to the quantizers it was "
                "learned on, or defend this model again"
            )
    for name, lp in plan.layers.items():  # every layer checked before any is changed
        install_rounding(layers[name], lp.integers)
    return model
