"""``defend``: EFRAP on a torch model, layer by layer in execution order.

Inputs of layer l come from the partially quantized model (earlier layers hard-rounded, layer
inputs quantized); targets from the float model. Only one layer's activations are cached at a time.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import EFRAPConfig
from .data import as_calibration
from .errors import DataError, ModelError
from .held_out import HeldOut, inputs_needed, split_calibration
from .layers import (
    core_weight,
    followed_by_relu,
    layer_forward,
    prepare_model,
    quantizable_layers,
    unlearned_layers,
    weight_axis,
)
from .loop import defend_layers
from .plan import RoundingPlan
from .rounding import LayerProblem
from .schemes import ActivationQuantizer, QuantScheme, scheme_preset

__all__ = ["defend", "capture"]

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


def _problems(
    prepared: nn.Module,
    quantized: nn.Module,
    layers: list[tuple[str, nn.Module]],
    calib: torch.Tensor,
    scheme: QuantScheme,
    with_relu: set[str],
) -> Iterator[LayerProblem]:
    """One problem per layer, built when the loop asks: by then earlier layers' integers are installed."""
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

        yield LayerProblem(
            name,
            weight,
            layer_scheme,
            forward,
            capture(quantized, q_layer, calib, "input"),
            targets,
            scale,
            zero_point,
            install,
        )
        del targets  # before the next layer's capture: one layer's activations held at a time


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
    model, ``plan.snap(model)`` float weights that the backend rounds to the plan's integers.
    """
    config = config or EFRAPConfig()
    if isinstance(scheme, str):
        scheme = scheme_preset(scheme, bits if bits is not None else 8)
    start = time.perf_counter()
    prepared = prepare_model(model, scheme)
    transposed = scheme.learns_conv_transpose
    layers = quantizable_layers(prepared, conv_transpose=transposed)
    calib = as_calibration(calib_data, inputs_needed(config))
    try:
        layers = quantizable_layers(prepared, calib[:1], conv_transpose=transposed)
    except RuntimeError as exc:
        raise DataError(
            f"calibration data: samples of shape {tuple(calib.shape[1:])} do not fit {type(model).__name__} ({exc})"
        ) from None
    skipped = unlearned_layers(prepared, transposed)
    for name, reason in skipped.items():
        log.warning("%s: %s", name, reason)
    calib, held = split_calibration(calib, config, prepared)
    with_relu = followed_by_relu(prepared) if config.unit == "activation" else set()
    quantized = copy.deepcopy(prepared)
    _install_act_quantizers(quantized, layers, calib, scheme)
    problems = _problems(prepared, quantized, layers, calib, scheme, with_relu)
    held_out = HeldOut.of_models(prepared, quantized, held) if config.budget is not None else None
    plans = defend_layers(problems, config, len(layers), progress, held_out)
    log.info("EFRAP: %d layers in %.1f s", len(plans), time.perf_counter() - start)
    meta = {"config": config.to_dict(), "calib_size": int(calib.shape[0]), "skipped": skipped}  # no timings
    return RoundingPlan(scheme, plans, "torch", meta)
