"""``defend``: EFRAP on a torch model, layer by layer in execution order.

Inputs of layer l come from the partially quantized model (earlier layers hard-rounded, layer
inputs quantized); targets from the float model. Only one layer's activations are cached at a time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import EFRAPConfig
from .defense import run
from .errors import DataError, ModelError
from .held_out import HeldOut, first_outputs
from .layer_inputs import pick_layer_inputs
from .layers import (
    core_weight,
    followed_by_relu,
    layer_forward,
    prepare_model,
    quantizable_layers,
    unlearned_layers,
    weight_axis,
)
from .plan import LayerPlan, RoundingPlan
from .producer import FoundLayers, Honours, LayerProblem, ProducedPlan, TensorCalibration
from .schemes import ActivationQuantizer, QuantScheme, scheme_preset

__all__ = ["TorchModelProducer", "capture", "defend"]

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, what: str, chunk: int = 256) -> torch.Tensor:
    """The input ('input') or output ('output') of ``layer`` for every image, stopping the forward early.

    A value wrapped with its quantization (Brevitas' QuantTensor) is captured as its ``.value``. A layer
    the forward pass never reaches is a ModelError.
    """
    parts: list[torch.Tensor] = []

    def keep(value) -> None:
        parts.append((value if isinstance(value, torch.Tensor) else value.value).detach())
        raise _Stop

    handle = (
        layer.register_forward_pre_hook(lambda _m, inp: keep(inp[0]))
        if what == "input"
        else layer.register_forward_hook(lambda _m, _inp, out: keep(out))
    )
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], chunk):
                try:
                    model(x[i : i + chunk])
                except _Stop:
                    continue
                raise ModelError(f"model: layer {type(layer).__name__} never ran in a forward pass")
    finally:
        handle.remove()
    return torch.cat(parts)


def _install_act_quantizers(
    model: nn.Module, layers: list[tuple[str, nn.Module]], calib: torch.Tensor, scheme: QuantScheme
) -> None:
    """Calibrate a per-tensor activation quantizer on each layer's float input; quantize it from now on."""
    for name, _ in layers:
        layer = model.get_submodule(name)
        quantizer = ActivationQuantizer(scheme.act_bits, scheme.act_range_rule)
        x = capture(model, layer, calib, "input")
        for i in range(0, x.shape[0], 32):
            quantizer.observe(x[i : i + 32])
        layer.register_forward_pre_hook(lambda _m, inp, q=quantizer: (q(inp[0]),) + tuple(inp[1:]))


def _then_relu(forward):
    return lambda x, w: torch.relu(forward(x, w))


class TorchModelProducer(TensorCalibration):
    """``defend``'s producer: a copy of the user's torch model, prepared as the backend prepares it
    (BatchNorm folded), and a second copy whose layer inputs are quantized per tensor and whose learned
    layers are installed as the loop goes: the reference's partially quantized model."""

    source = "torch"
    flow = "torch"
    honours = Honours(layer_inputs=("quantized", "float", "mixed"), units=("activation", "layer"))

    def __init__(self, model: nn.Module, scheme: QuantScheme) -> None:
        self.scheme = scheme
        self.prepared = prepare_model(model, scheme)
        self.model_name = type(model).__name__
        self.conv_transpose = scheme.learns_conv_transpose
        # a model with no layer to learn is refused before the calibration data is read
        quantizable_layers(self.prepared, conv_transpose=self.conv_transpose)
        self.layers: list[tuple[str, nn.Module]] = []
        self.quantized: nn.Module | None = None

    def running(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the user's model is never touched: everything runs on copies

    def find_layers(self, calib: torch.Tensor, config: EFRAPConfig) -> FoundLayers:
        try:
            self.layers = quantizable_layers(self.prepared, calib[:1], conv_transpose=self.conv_transpose)
        except RuntimeError as exc:
            raise DataError(
                f"calibration data: samples of shape {tuple(calib.shape[1:])} do not fit {self.model_name} ({exc})"
            ) from None
        return FoundLayers(
            [name for name, _ in self.layers], unlearned_layers(self.prepared, self.conv_transpose)
        )

    def float_outputs(self, calib: torch.Tensor) -> torch.Tensor:
        return first_outputs(self.prepared, calib)

    def problems(self, calib: torch.Tensor, config: EFRAPConfig) -> Iterator[LayerProblem]:
        self.quantized = copy.deepcopy(self.prepared)
        self.quantize_activations(self.quantized, calib)
        with_relu = followed_by_relu(self.prepared) if config.unit == "activation" else set()
        return _problems(self.prepared, self.quantized, self.layers, calib, self.scheme, with_relu, config)

    def quantize_activations(self, quantized: nn.Module, calib: torch.Tensor) -> None:
        """Make ``quantized`` quantize each learned layer's input as the backend will: per tensor,
        calibrated on ``calib`` (the static flows'); a producer of another backend replaces this."""
        _install_act_quantizers(quantized, self.layers, calib, self.scheme)

    def held_out(self, held: torch.Tensor) -> HeldOut:
        return HeldOut.of_models(self.prepared, self.quantized, held)

    def finish(self, learned: dict[str, LayerPlan]) -> ProducedPlan:
        return ProducedPlan(self.scheme, learned)


def _problems(
    prepared: nn.Module,
    quantized: nn.Module,
    layers: list[tuple[str, nn.Module]],
    calib: torch.Tensor,
    scheme: QuantScheme,
    with_relu: set[str],
    config: EFRAPConfig,
) -> Iterator[LayerProblem]:
    """One problem per layer, built when the loop asks: by then earlier layers' integers are installed."""
    generator = torch.Generator().manual_seed(config.seed)
    for i, (name, layer) in enumerate(layers):
        position = "first" if i == 0 else "last" if i == len(layers) - 1 else "middle"
        layer_scheme = scheme.for_layer(position)
        q_layer = quantized.get_submodule(name)
        forward, targets = layer_forward(layer), capture(prepared, layer, calib, "output")
        if name in with_relu:
            forward, targets = _then_relu(forward), torch.relu(targets)

        weight = core_weight(layer).clone()  # output channels first (a ConvTranspose's axis 1)
        scale, zero_point = layer_scheme.qparams(weight)

        def install(integers, q_layer=q_layer, scheme=layer_scheme, scale=scale, zero_point=zero_point):
            with torch.no_grad():
                q_layer.weight.copy_(
                    scheme.dequantize(integers, scale, zero_point).movedim(0, weight_axis(q_layer))
                )

        def inputs_of(kind, layer=layer, q_layer=q_layer):
            return (
                capture(quantized, q_layer, calib, "input")
                if kind == "quantized"
                else capture(prepared, layer, calib, "input")
            )

        inputs = pick_layer_inputs(config.layer_inputs, inputs_of, generator)
        yield LayerProblem(name, weight, layer_scheme, forward, inputs, targets, scale, zero_point, install)
        del inputs, targets  # before the next layer's capture: one layer's activations held at a time


def defend(
    model: nn.Module,
    calib_data: Any,
    scheme: QuantScheme | str = "onnxruntime",
    config: EFRAPConfig | None = None,
    bits: int | None = None,
    progress: bool = True,
) -> RoundingPlan:
    """Learn a backdoor-removing rounding of ``model``'s Conv/Linear weights for ``scheme``.

    ``model`` is not modified. ``calib_data``: unlabeled images (tensor, array, .npz path, LabeledData
    or an iterable of batches). Returns a RoundingPlan; ``plan.apply(model)`` gives the fake-quantized
    model, ``plan.snap(model)`` float weights that the backend rounds to the plan's integers. Each
    layer's inputs come from the partially quantized copy (``config.layer_inputs`` None or "quantized",
    the reference), the float model ("float") or a mix of both ("mixed").
    """
    if isinstance(scheme, str):
        scheme = scheme_preset(scheme, bits if bits is not None else 8)
    return run(TorchModelProducer(model, scheme), calib_data, config, progress=progress)
