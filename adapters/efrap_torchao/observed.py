"""EFRAP inside the user's own torch.ao / torchao flow: one call between their calibration and convert.

The grid of every weight is read from the observers the user's quantizer (PT2E), QConfigMapping (FX)
or qconfig (eager) put in the prepared model; never chosen here. Each quantized Conv / Linear becomes a
LayerProblem for the core's one per-layer loop: its inputs mix, element by element, the prepared model
with activation observers fake-quantizing (the reference's partially quantized model) and the float
model (``layer_inputs``, see efrap_plugin.layer_inputs); its targets come from a float copy. The learned
integers are installed by snapping the prepared model's weights to ``scale * (q - zero_point)`` (each
channel's abs-max element kept exact, so every observer recomputes the same scale): the user's own
``convert_pt2e`` / ``convert_fx`` / ``convert`` then rounds them to exactly the plan's integers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from efrap_plugin import (
    CONV_TRANSPOSE,
    LayerPlan,
    QuantScheme,
    RoundingPlan,
    capture,
    execution_order,
    layer_kinds,
    mix_layer_inputs,
    on_device_of,
    pick_layer_inputs,
    snap_integers,
)
from efrap_plugin.config import EFRAPConfig, LayerInputs
from efrap_plugin.defense import run, with_layer_inputs
from efrap_plugin.errors import DataError, EFRAPError, ModelError
from efrap_plugin.held_out import HeldOut, first_outputs
from efrap_plugin.producer import FoundLayers, Honours, LayerProblem, ProducedPlan, TensorCalibration

from .graph_run import GraphRun

__all__ = ["ObservedModelProducer", "defend_prepared", "observer_grid", "observer_scheme", "spec_scheme"]

log = logging.getLogger(__name__)

_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine, torch.per_channel_affine_float_qparams)
_GRAPH_OPS = {"aten.conv1d.default", "aten.conv2d.default", "aten.linear.default"}
_GRAPH_TRANSPOSED_OPS = {"aten.conv_transpose1d.default", "aten.conv_transpose2d.input"}
"""ConvTranspose: the weight is C_in x C_out / groups x k, its output channels on axis 1."""
_RELU_OPS = {"aten.relu.default", "aten.relu_.default"}
_CHUNK = 64
"""Calibration inputs run through a model at once while capturing: a node's transients are 64 rows', not 256
(ResNet-18 PT2E, 1,024 inputs: peak 2,035 -> 2,011 MiB, capture no slower)."""


@dataclass
class _Layer:
    """A quantized Conv / Linear of the prepared model, however the flow represents it."""

    name: str
    owner: nn.Module  # the prepared model's module holding the weight, as ``owner.<attr>``
    attr: str
    observer: nn.Module  # its weight observer (PT2E: the graph's; FX / eager: a fresh one from the qconfig)
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    transposed: bool = False  # a ConvTranspose: output channels on axis 1 of its weight
    nodes: tuple[str, str] | None = None  # PT2E: the graph nodes of its input and of its output (GraphRun)
    capture_in: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None  # FX / eager: by module hooks
    capture_out: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


def _weight(layer: _Layer) -> torch.Tensor:
    return getattr(layer.owner, layer.attr)


def _axes(layer: _Layer) -> tuple[int, ...]:
    """The weight axes a layer's per-channel scales may run along: its output channels' (a ConvTranspose's
    axis 1), or, for a ConvTranspose, its input channels' (XNNPACK's per-channel spec asks for axis 0)."""
    return (0, 1) if layer.transposed else (0,)


def _core_axis(layer: _Layer, scheme: QuantScheme) -> int:
    """The weight axis moved first for the core: the per-channel observer's, else the output channels'."""
    if scheme.per_channel:
        return int(getattr(layer.observer, "ch_axis", 0))
    return 1 if layer.transposed else 0


def _is_observer(module: nn.Module) -> bool:
    return hasattr(module, "calculate_qparams") and hasattr(module, "quant_min")


def observer_scheme(
    observer: nn.Module, where: str = "weight observer", axes: tuple[int, ...] = (0,)
) -> QuantScheme:
    """The integer grid a weight observer (or its constructor's product) rounds to, as a QuantScheme:
    what ``defend_prepared`` learns on and what an attack aimed at this flow protects.

    Raises EFRAPError naming ``where`` for grids EFRAP does not learn on (affine or non-integer weights,
    per-channel scales along an axis not in ``axes``: 0, and 1 for a ConvTranspose; more than 8 bits).
    """
    qscheme, dtype = getattr(observer, "qscheme", None), getattr(observer, "dtype", None)
    if dtype not in (torch.qint8, torch.int8, torch.quint8, torch.uint8):
        raise EFRAPError(f"{where}: weight observer dtype {dtype} is not an 8-bit or narrower integer grid")
    if qscheme not in _SYMMETRIC:
        raise EFRAPError(
            f"{where}: weight observer {type(observer).__name__} uses {qscheme}; EFRAP needs symmetric weights "
            "(per_tensor_symmetric or per_channel_symmetric, torch's and torchao's default)"
        )
    per_channel = qscheme in _PER_CHANNEL
    if per_channel and getattr(observer, "ch_axis", 0) not in axes:
        raise EFRAPError(
            f"{where}: per-channel scales along axis {observer.ch_axis}; EFRAP learns grids along axis "
            + " or ".join(str(a) for a in axes)
        )
    qmin, qmax = int(observer.quant_min), int(observer.quant_max)
    bits = math.ceil(math.log2(qmax - qmin + 1))
    if not 2 <= bits <= 8:
        raise EFRAPError(
            f"{where}: weights on [{qmin}, {qmax}] ({bits} bits); EFRAP defends 2- to 8-bit grids"
        )
    return QuantScheme(
        name="torchao-observer",
        bits=bits,
        qmin=qmin,
        qmax=qmax,
        per_channel=per_channel,
        range_rule="absmax",
        scale_precision="float32",
        inverse_scale=True,
    )


def spec_scheme(spec: Any, where: str = "QuantizationSpec.weight") -> QuantScheme:
    """The grid a PT2E ``QuantizationSpec`` (say, ``quantization_config.weight``) asks for, as a QuantScheme:
    what an attack aimed at that quantizer protects. Unset quant_min / quant_max take the dtype's range."""
    info = torch.iinfo(spec.dtype) if spec.dtype in (torch.int8, torch.uint8) else None
    fields = {
        "qscheme": spec.qscheme,
        "dtype": spec.dtype,
        "quant_min": spec.quant_min if spec.quant_min is not None else (info.min if info else None),
        "quant_max": spec.quant_max if spec.quant_max is not None else (info.max if info else None),
        "ch_axis": spec.ch_axis if spec.ch_axis is not None else 0,
    }
    return observer_scheme(SimpleNamespace(**fields), where)


def observer_grid(
    observer: nn.Module, where: str, axes: tuple[int, ...] = (0,)
) -> tuple[QuantScheme, torch.Tensor, torch.Tensor]:
    """A calibrated weight observer's grid: scheme, and the scale and zero point it computed."""
    scheme = observer_scheme(observer, where, axes)
    scale, zero_point = observer.calculate_qparams()
    return (
        scheme,
        scale.detach().reshape(-1).to(torch.float32),
        zero_point.detach().reshape(-1).to(torch.int32),
    )


# ----- capturing layer inputs and outputs ----------------------------------------------------------
def _chunks(fn: Callable[[torch.Tensor], torch.Tensor], calib: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(calib[i : i + _CHUNK]) for i in range(0, calib.shape[0], _CHUNK)])


@contextlib.contextmanager
def _observers(model: nn.Module, fake_quantize: bool, weight_observers: set[int]) -> Iterator[None]:
    """Observers stop observing; activation observers fake-quantize (``fake_quantize``) or pass through.

    Weight observers (ids in ``weight_observers``) always pass through: the weights themselves carry
    the learned integers.
    """
    swapped = []
    for module in model.modules():
        if not _is_observer(module):
            continue
        if fake_quantize and id(module) not in weight_observers and _has_stats(module):
            module.forward = _fake_quantizer(module)
        else:
            module.forward = lambda x: x
        swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def _fake_quantizer(observer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the converted model does at an activation observer: quantize and dequantize per tensor."""
    scale, zero_point = observer.calculate_qparams()
    s, z = float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])
    lo, hi = int(observer.quant_min), int(observer.quant_max)
    return lambda x: torch.fake_quantize_per_tensor_affine(x, s, z, lo, hi)


def _has_stats(observer: nn.Module) -> bool:
    lo = getattr(observer, "min_val", None)
    return isinstance(lo, torch.Tensor) and lo.numel() > 0 and bool(torch.isfinite(lo).all())


def _check_fits(model: nn.Module, calib: torch.Tensor, layers: list[_Layer]) -> None:
    """The calibration data runs through the prepared model (a batch of its size, where an export fixed
    one), or a DataError naming its shape; torch's own refusal is a guard's bare assertion."""
    try:
        with torch.no_grad(), _observers(model, False, set()):
            for rows in {1, min(2, len(calib))}:  # the defense runs batches of several sizes
                model(calib[:rows])
    except (AssertionError, RuntimeError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(
            f"calibration data: inputs of shape {tuple(calib.shape[1:])} do not run through the prepared model "
            f"({first}); pass inputs shaped as the model was prepared with (an export with a fixed batch size "
            "takes only that size: export with dynamic_shapes for a dynamic batch)"
        ) from None


def _check_calibrated(model: nn.Module, weight_observers: set[int]) -> None:
    """Refuse a prepared model whose activation observers saw no data: convert would give them the
    default qparams (scale 1.0), and the model it writes is broken whatever its weights' rounding."""
    blind = [
        name
        for name, m in model.named_modules()
        if _is_observer(m) and id(m) not in weight_observers and hasattr(m, "min_val") and not _has_stats(m)
    ]
    if not blind:
        return
    seen = sum(
        1 for m in model.modules() if _is_observer(m) and id(m) not in weight_observers and _has_stats(m)
    )
    if not seen:
        raise ModelError(
            f"prepared: none of its {len(blind)} activation observers has seen data (it was never calibrated), "
            "so convert would quantize activations with scale 1.0; run your calibration batches through the "
            "prepared model (with torch.no_grad()) before defend_prepared"
        )
    log.warning(
        "prepared: %d activation observers saw no data during calibration (%s): convert gives them scale 1.0",
        len(blind),
        ", ".join(blind[:4]),
    )


# ----- the layers of each flow ------------------------------------------------------------------------
def _source_name(node: torch.fx.Node) -> str:
    """The user's module name of a PT2E graph node (what verify reads back too)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else node.name


def _graph_tensor(gm: torch.fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """A constant operand of a PT2E node: None, a get_attr, or an observer over a get_attr."""
    if arg is None:
        return None
    if (
        getattr(arg, "op", None) == "call_module"
        and arg.args
        and getattr(arg.args[0], "op", None) == "get_attr"
    ):
        arg = arg.args[0]
    if getattr(arg, "op", None) != "get_attr":
        raise ModelError(
            f"model: operand {arg} of a quantized layer is computed in the graph; expected a constant"
        )
    return (
        gm.get_parameter(arg.target)
        if arg.target in dict(gm.named_parameters())
        else gm.get_buffer(arg.target)
    )


def _graph_layers(gm: torch.fx.GraphModule, relu_units: bool) -> tuple[list[_Layer], dict[str, str]]:
    """PT2E: aten conv / linear nodes whose weight input is an observer over a get_attr."""
    layers, skipped = [], {}
    for node in gm.graph.nodes:
        op = str(node.target) if node.op == "call_function" else ""
        observed = len(node.args) > 1 and getattr(node.args[1], "op", None) == "call_module"
        transposed = op in _GRAPH_TRANSPOSED_OPS
        if "conv_transpose" in op and observed and not transposed:
            skipped[_source_name(node)] = (
                f"{op}: a ConvTranspose EFRAP does not model; left at nearest rounding"
            )
            continue
        if (
            (op not in _GRAPH_OPS and not transposed)
            or not observed
            or getattr(node.args[1].args[0], "op", None) != "get_attr"
        ):
            continue
        users = list(node.users)
        out = users[0] if relu_units and len(users) == 1 and str(users[0].target) in _RELU_OPS else node
        bias, rest, aten = (
            _graph_tensor(gm, node.args[2] if len(node.args) > 2 else None),
            node.args[3:],
            node.target,
        )
        bias = bias.detach().clone() if bias is not None else None

        def forward(x, w, aten=aten, bias=bias, rest=rest, relu=out is not node):
            y = aten(x, w, on_device_of(bias, x), *rest)
            return torch.relu(y) if relu else y

        owner, _, attr = node.args[1].args[0].target.rpartition(".")
        layers.append(
            _Layer(
                _source_name(node),
                gm.get_submodule(owner),
                attr,
                gm.get_submodule(node.args[1].target),
                forward,
                transposed,
                (node.args[0].name, out.name),
            )
        )
    return layers, skipped


def _module_layers(model: nn.Module, relu_units: bool) -> tuple[list[_Layer], dict[str, str]]:
    """FX / eager: modules carrying a qconfig, plain or fused with a ReLU; in execution order."""
    import torch.ao.nn.intrinsic as nni

    layers, skipped, inside_fused = [], {}, set()
    for name, module in model.named_modules():
        qconfig = getattr(module, "qconfig", None)
        if (
            qconfig is None
            or getattr(qconfig, "weight", None) is None
            or name.rpartition(".")[0] in inside_fused
        ):
            continue
        fused = isinstance(module, nni._FusedModule)
        if fused:
            inside_fused.add(name)  # its Conv / Linear carries the qconfig too: one layer, not two
        inner = module[0] if fused else module
        inner_name = f"{name}.0" if fused else name
        if isinstance(inner, nn.ConvTranspose3d):
            skipped[name] = "ConvTranspose3d: a form EFRAP does not model; left at nearest rounding"
            continue
        if isinstance(inner, (nn.Embedding, nn.EmbeddingBag)):  # float_qparams_weight_only_qconfig's tables
            skipped[name] = (
                f"{type(inner).__name__}: not a Conv / Linear layer EFRAP learns; left at nearest rounding"
            )
            continue
        if not isinstance(inner, layer_kinds(conv_transpose=True)) or type(inner).__module__.startswith(
            "torch.ao.nn.quantized"
        ):
            continue
        observer = qconfig.weight()
        observer(inner.weight.detach())
        relu = relu_units and fused and any(isinstance(m, nn.ReLU) for m in module)
        bias = inner.bias.detach().clone() if inner.bias is not None else None
        transposed = isinstance(inner, CONV_TRANSPOSE)
        if isinstance(inner, nn.Linear):
            base = lambda x, w, b=bias: F.linear(x, w, on_device_of(b, x))  # noqa: E731
        elif transposed:
            base = _conv_transpose(inner, bias)
        else:
            twin = copy.deepcopy(inner)
            base = lambda x, w, b=bias, c=twin: c._conv_forward(x, w, on_device_of(b, x))  # noqa: E731
        layers.append(
            _Layer(
                name,
                inner,
                "weight",
                observer,
                (lambda x, w, f=base: torch.relu(f(x, w))) if relu else base,
                transposed,
                capture_in=lambda m, x, n=inner_name: capture(m, m.get_submodule(n), x, "input"),
                capture_out=lambda m, x, n=name if relu else inner_name: capture(
                    m, m.get_submodule(n), x, "output"
                ),
            )
        )
    return layers, skipped


def _conv_transpose(
    module: nn.Module, bias: torch.Tensor | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What a ConvTranspose module computes with weight ``w`` (its own layout), called without
    ``output_size``: its output_padding decides the output's size."""
    deconv = F.conv_transpose1d if isinstance(module, nn.ConvTranspose1d) else F.conv_transpose2d
    args = (module.stride, module.padding, module.output_padding, module.groups, module.dilation)
    return lambda x, w: deconv(x, w, on_device_of(bias, x), *args)


def _execution_order(model: nn.Module, layers: list[_Layer], x: torch.Tensor) -> list[_Layer]:
    """``layers`` in the order a forward pass calls them, observers passing through."""
    with _observers(model, False, set()):
        order = execution_order(model, {layer.name: model.get_submodule(layer.name) for layer in layers}, x)
    by_name = {layer.name: layer for layer in layers}
    return [by_name[name] for name in order]


def _problems(
    model: nn.Module,
    float_copy: nn.Module,
    layers: list[_Layer],
    grids: list[tuple[QuantScheme, torch.Tensor, torch.Tensor]],
    axes: list[int],
    calib: torch.Tensor,
    choice: str,
    seed: int,
    ids: set[int],
) -> Iterator[LayerProblem]:
    """One problem per layer, its weight with axis ``axes[i]`` (the grid's channels) moved first;
    ``ids``: every weight observer's, learned or not (they pass the weight through)."""
    generator = torch.Generator().manual_seed(seed)
    runs = (  # PT2E: each model's graph runs once over the calibration data, as far as asked
        {
            "quantized": GraphRun(model, calib, _CHUNK, lambda: _observers(model, True, ids)),
            "float": GraphRun(float_copy, calib, _CHUNK, lambda: _observers(float_copy, False, set())),
        }
        if all(layer.nodes for layer in layers)
        else None
    )
    for layer, (scheme, scale, zero_point), axis in zip(layers, grids, axes, strict=True):
        if runs is not None:
            inputs, targets = _graph_inputs(runs, layer.nodes, choice, generator)
        else:
            inputs = pick_layer_inputs(
                choice,
                lambda kind, layer=layer: _module_inputs(model, float_copy, layer, kind, calib, ids),
                generator,
            )
            with _observers(float_copy, False, set()):
                targets = _chunks(lambda x, layer=layer: layer.capture_out(float_copy, x), calib)
        w0 = _weight(layer).detach().movedim(axis, 0).clone(memory_format=torch.contiguous_format)
        forward = layer.forward if axis == 0 else lambda x, w, f=layer.forward, a=axis: f(x, w.movedim(0, a))

        def install(
            integers, layer=layer, w0=w0, scheme=scheme, scale=scale, zero_point=zero_point, axis=axis
        ):
            # a new Parameter, never an in-place write: the prepared model may share tensors with the
            # user's float model (torch.export does), which must stay as it was
            snapped = snap_integers(w0, integers, scale, zero_point, scheme).movedim(0, axis).contiguous()
            setattr(layer.owner, layer.attr, nn.Parameter(snapped, requires_grad=False))

        yield LayerProblem(layer.name, w0, scheme, forward, inputs, targets, scale, zero_point, install)
        del inputs, targets  # before the next layer's capture: one layer's activations held at a time


def _graph_inputs(
    runs: dict[str, GraphRun], nodes: tuple[str, str], choice: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """PT2E: a layer's inputs and targets from the two runs. The float run passes the layer for the
    targets and then no longer holds the layer's float inputs: the mixed inputs are written over them,
    one layer's activations fewer at the peak (ResNet-18, 1,024 inputs: 256 MiB). ``choice`` is checked
    by defend_prepared."""
    first, last = nodes
    quantized = runs["quantized"].value(first) if choice != "float" else None
    floating = runs["float"].value(first) if choice != "quantized" else None
    targets = runs["float"].value(last)
    if choice != "mixed":
        return (floating if quantized is None else quantized), targets
    reuse = not runs["float"].holds(floating) and not runs["quantized"].holds(floating)
    return mix_layer_inputs(quantized, floating, generator, out=floating if reuse else None), targets


def _module_inputs(
    model: nn.Module, float_copy: nn.Module, layer: _Layer, kind: str, calib: torch.Tensor, ids: set[int]
) -> torch.Tensor:
    """FX / eager: what reaches ``layer`` in the prepared model ("quantized") or the float copy."""
    source = model if kind == "quantized" else float_copy
    with _observers(source, kind == "quantized", ids):
        return _chunks(lambda x: layer.capture_in(source, x), calib)


def _held_out(model: nn.Module, float_copy: nn.Module, ids: set[int], held: torch.Tensor) -> HeldOut:
    """Budget mode: the float copy's outputs on the held-out inputs, and the prepared model's with its
    activation observers fake-quantizing and the learned weights snapped in so far."""
    return HeldOut.of_models(_run(float_copy, False, ids), _run(model, True, ids), held)


_DEFENDED = "_efrap_defended"
"""Set on a prepared model whose weights defend_prepared snapped."""


@contextlib.contextmanager
def _eval_mode(model: nn.Module, enabled: bool) -> Iterator[None]:
    """``model`` in eval mode for the block, each module's own mode restored after."""
    modes = {m: m.training for m in model.modules()} if enabled else {}
    if enabled:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def _run(source: nn.Module, fake_quantize: bool, ids: set[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``source`` as a callable, its activation observers fake-quantizing or not (``ids``: the weight
    observers, which pass the weights through)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        with _observers(source, fake_quantize, ids):
            return source(x)

    return forward


def _check_undefended(prepared: Any) -> None:
    """A prepared model, not yet defended: a second defense would learn from snapped weights."""
    if not isinstance(prepared, nn.Module):
        raise EFRAPError(
            f"prepared: expected the model prepare_pt2e / prepare_fx / prepare returned, got {type(prepared).__name__}"
        )
    if getattr(prepared, _DEFENDED, False):
        raise EFRAPError(
            "prepared: defend_prepared already snapped its weights to a plan's integers; a second defense "
            "would learn from those, not from the float weights. Prepare and calibrate the float model "
            "again to defend it with another config"
        )


def _observed_layers(
    prepared: nn.Module, calib: torch.Tensor, graph: bool, relu_units: bool
) -> tuple[list[_Layer], dict[str, str]]:
    """The layers EFRAP learns, in the order a forward pass calls them, and those it names as skipped;
    refused with the fix when the model was never calibrated, the calibration does not run through it,
    or it has no observed Conv / Linear."""
    layers, skipped = _graph_layers(prepared, relu_units) if graph else _module_layers(prepared, relu_units)
    if layers:  # a model with nothing to learn is named as such below
        _check_calibrated(prepared, {id(layer.observer) for layer in layers})
        _check_fits(prepared, calib, layers)
    if not graph:
        layers = _execution_order(prepared, layers, calib[:1])
    if not layers:
        raise ModelError(
            f"prepared: no Conv / Linear weight with an observer in {type(prepared).__name__}; call defend_prepared "
            "after prepare_pt2e / prepare_fx / prepare (with a qconfig that quantizes weights) and calibration"
        )
    return layers, skipped


class ObservedModelProducer(TensorCalibration):
    """``defend_prepared``'s producer: the user's prepared model, its activation observers
    fake-quantizing for the partially quantized model, and a float copy sharing its tensors; the
    learned integers go in by snapping the prepared model's weights, which the user's convert rounds."""

    source = "torchao"
    honours = Honours(layer_inputs=("mixed", "quantized", "float"), units=("activation", "layer"))

    def __init__(self, prepared: nn.Module, *, asked: Callable[[nn.Module], bool] | None = None) -> None:
        """``asked``: given a layer's weight observer, whether EFRAP learns that layer (None: every
        observed layer); the others are named in the plan and left to the user's convert, at nearest."""
        _check_undefended(prepared)
        self.prepared = prepared
        self.asked = asked
        self.weight_observers: set[int] = set()
        self.graph = isinstance(prepared, torch.fx.GraphModule) and any(
            str(n.target) in _GRAPH_OPS for n in prepared.graph.nodes if n.op == "call_function"
        )
        self.flow = "pt2e" if self.graph else "torch.ao"
        self.layers: list[_Layer] = []
        self.grids: list[tuple[QuantScheme, torch.Tensor, torch.Tensor]] = []
        self.axes: list[int] = []
        self.float_copy: nn.Module | None = None
        self.originals: dict[str, torch.Tensor] = {}

    def running(self) -> contextlib.AbstractContextManager[None]:
        """The captures run the user's model in eval mode, so its BatchNorm statistics stay as
        calibration left them (an exported PT2E graph has no train / eval switch and is left as it is)."""
        return _eval_mode(self.prepared, enabled=not self.graph)

    def find_layers(self, calib: torch.Tensor, config: EFRAPConfig) -> FoundLayers:
        """The observed layers and their grids (every grid read before any work: an observer EFRAP
        cannot follow is named first), and the float copy: the prepared model's structure, its tensors
        shared (install puts new Parameters in and nothing writes to a tensor in place)."""
        found, skipped = _observed_layers(self.prepared, calib, self.graph, config.unit == "activation")
        self.weight_observers = {id(layer.observer) for layer in found}
        layers = [layer for layer in found if self.asked is None or self.asked(layer.observer)]
        skipped = {
            **skipped,
            **{
                layer.name: "not asked: its QuantizationConfig is not with_efrap(...); left at nearest rounding"
                for layer in found
                if layer not in layers
            },
        }
        if not layers:
            raise ModelError(
                "prepared: none of its observed Conv / Linear layers has a with_efrap(...) weight config; "
                "wrap the QuantizationConfig of the layers to defend, or none of them to defend every layer"
            )
        self.layers = layers
        self.grids = [
            observer_grid(layer.observer, f"layer {layer.name!r}", _axes(layer)) for layer in layers
        ]
        self.axes = [_core_axis(layer, grid[0]) for layer, grid in zip(layers, self.grids, strict=True)]
        shared = {id(t): t for t in (*self.prepared.parameters(), *self.prepared.buffers())}
        self.float_copy = copy.deepcopy(self.prepared, shared)
        # a module called more than once (tied weights): PT2E names each call by its graph node
        readers = [(layer.name, layer.nodes[1] if layer.nodes else layer.name) for layer in layers]
        return FoundLayers([layer.name for layer in layers], skipped, readers=readers)

    def float_outputs(self, calib: torch.Tensor) -> torch.Tensor:
        return first_outputs(_run(self.float_copy, False, self.weight_observers), calib)

    def problems(self, calib: torch.Tensor, config: EFRAPConfig) -> Iterator[LayerProblem]:
        self.originals = {
            layer.name: _weight(layer) for layer in self.layers
        }  # install puts new Parameters in
        return _problems(
            self.prepared,
            self.float_copy,
            self.layers,
            self.grids,
            self.axes,
            calib,
            config.layer_inputs,
            config.seed,
            self.weight_observers,
        )

    def held_out(self, held: torch.Tensor) -> HeldOut:
        return _held_out(self.prepared, self.float_copy, self.weight_observers, held)

    def finish(self, learned: dict[str, LayerPlan]) -> ProducedPlan:
        """Integers in each weight's own layout, as convert stores it (a ConvTranspose's learned with
        axis 1 first); the prepared model is marked defended."""
        axis_of = {layer.name: axis for layer, axis in zip(self.layers, self.axes, strict=True)}
        plans = {
            name: lp.in_weight_layout(self.originals[name], axis_of[name]) for name, lp in learned.items()
        }
        setattr(self.prepared, _DEFENDED, True)
        return ProducedPlan(self.grids[0][0], plans)


def defend_prepared(
    prepared: nn.Module,
    calib_data: Any,
    config: EFRAPConfig | None = None,
    *,
    layer_inputs: LayerInputs | None = None,
    progress: bool = True,
) -> RoundingPlan:
    """EFRAP on a model the user prepared and calibrated with their own quantizer / QConfigMapping / qconfig.

    Call it between calibration and ``convert_pt2e`` / ``convert_fx`` / ``convert``: it reads each
    weight's grid from the observers, learns the rounding layer by layer and snaps ``prepared``'s
    weights (in place) so that the user's convert writes the returned plan's integers. Observer
    statistics are left as calibration made them. ``layer_inputs`` (shorthand for
    ``config.layer_inputs``): "mixed" (the default: the only choice that removed the backdoor within a
    point of float accuracy on every benchmarked grid, benchmarks/results/layer-inputs.md), "quantized"
    (the reference: lower asr on per-channel grids, 1.1-1.5 points of accuracy lost on per-tensor ones)
    or "float".
    """
    return run(
        ObservedModelProducer(prepared),
        calib_data,
        with_layer_inputs(config, layer_inputs),
        progress=progress,
    )
