"""Finding the layers a backend quantizes, in execution order, and folding BatchNorm like it does."""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping

import torch
from torch import nn

from .errors import ModelError
from .schemes import QuantScheme

__all__ = [
    "QUANTIZABLE",
    "quantizable_layers",
    "unlearned_layers",
    "CONV_TRANSPOSE",
    "layer_kinds",
    "core_weight",
    "weight_axis",
    "prepare_model",
    "fingerprint",
    "layer_forward",
    "check_finite_weights",
    "followed_by_relu",
    "relu_after",
]

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d)
"""Learned where the scheme's backend quantizes them (``QuantScheme.learns_conv_transpose``): their
weight is C_in x C_out / groups x k, output channels on axis 1, which the core sees first (``core_weight``)."""


def layer_kinds(conv_transpose: bool = False) -> tuple[type[nn.Module], ...]:
    """The module types the core learns: QUANTIZABLE, and CONV_TRANSPOSE where the grid's backend
    quantizes them (``QuantScheme.learns_conv_transpose``)."""
    return QUANTIZABLE + CONV_TRANSPOSE if conv_transpose else QUANTIZABLE


def quantizable_layers(
    model: nn.Module, example: torch.Tensor | None = None, conv_transpose: bool = False
) -> list[tuple[str, nn.Module]]:
    """Conv1d / Conv2d / Linear modules (and ConvTranspose 1-D / 2-D with ``conv_transpose``), in the
    order a forward pass calls them (topological order).

    Without an example input, the order is the module registration order.
    """
    refuse_quantized_layers(model)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, layer_kinds(conv_transpose))]
    if not found:
        if _is_exported_graph(model):
            raise ModelError(_EXPORTED)
        raise ModelError(
            f"model: {type(model).__name__} has no Conv1d, Conv2d or Linear layer; EFRAP learns the rounding "
            "of those layers' weights, so there is nothing to defend"
        )
    if example is None:
        return found
    modules = dict(found)
    return [(name, modules[name]) for name in execution_order(model, modules, example)]


NOT_LEARNED = (*CONV_TRANSPOSE, nn.ConvTranspose3d, nn.Conv3d)
"""Weighted layers a backend may quantize that the torch path does not learn."""


def unlearned_layers(model: nn.Module, conv_transpose: bool = False) -> dict[str, str]:
    """The model's layers a backend may quantize that the torch path leaves at nearest rounding, with
    the reason and where they are learned: the user is told, and verify fails on them, never silently.
    With ``conv_transpose`` (the scheme learns them), ConvTranspose 1-D / 2-D are not among them."""
    return {
        name: (
            f"{type(m).__name__}: the torch path learns Conv1d / Conv2d / Linear, and ConvTranspose 1-D / 2-D "
            "on onnxruntime's and the paper's grids; the onnxruntime drop-in (quantize_static) and the "
            "torch.ao flows (defend_prepared) learn a ConvTranspose 1-D / 2-D on theirs; not learned here "
            "(the backend's own rounding, where it quantizes it)"
        )
        for name, m in model.named_modules()
        if isinstance(m, NOT_LEARNED) and not (conv_transpose and isinstance(m, CONV_TRANSPOSE))
    }


def weight_axis(layer: nn.Module) -> int:
    """The axis of ``layer.weight`` that holds its output channels: 1 for a ConvTranspose, else 0."""
    return 1 if isinstance(layer, CONV_TRANSPOSE) else 0


def core_weight(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` (detached) with its output channels first, as the core learns and plans it."""
    return layer.weight.detach().movedim(weight_axis(layer), 0).contiguous()


def execution_order(model: nn.Module, modules: Mapping[str, nn.Module], example: torch.Tensor) -> list[str]:
    """The names of ``modules`` in the order one forward pass of ``model`` on ``example`` first calls
    them (modules are often registered out of order); modules it never calls are left out."""
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _i, n=name: order.append(n)) for name, m in modules.items()
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(order))


_EXPORTED = (
    "model: an exported graph (torch.export): its Conv / Linear layers are graph operations, not modules. "
    "Pass the nn.Module it was exported from, or defend it inside your PT2E flow: "
    "efrap_torchao.defend_prepared(prepare_pt2e(exported.module(), quantizer), calib) before convert_pt2e"
)


def _is_exported_graph(model: nn.Module) -> bool:
    graph = getattr(model, "graph", None)
    return any(
        node.op == "call_function" and ("conv" in str(node.target) or "linear" in str(node.target))
        for node in getattr(graph, "nodes", ())
    )


def refuse_quantized_layers(model: nn.Module) -> None:
    """Brevitas layers carry their own weight quantizer: a preset grid here would ignore it (a user's
    int4 or fixed-point layer silently defended as int8), so they go to the Brevitas adapter."""
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE) and callable(getattr(module, "quant_weight", None)):
            raise ModelError(
                f"model: layer {name!r} is a Brevitas {type(module).__name__} with its own weight quantizer; "
                "defend it with efrap_brevitas.defend_quant_model(model, calib), which learns on the grid "
                "that quantizer defines"
            )


def check_finite_weights(model: nn.Module) -> None:
    """Refuse weights the defense cannot learn from: on the meta device (no values), in another float
    precision than the float32 it learns in, or holding NaN / Inf."""
    for name, param in model.named_parameters():
        if param.is_meta:
            raise ModelError(
                f"model: parameter {name!r} is on the meta device (no values); load the weights first"
            )
        if param.is_floating_point() and param.dtype != torch.float32:
            raise ModelError(
                f"model: parameter {name!r} is {param.dtype}; EFRAP learns in float32, as the PTQ flows read "
                "the float model: pass a float32 copy (copy.deepcopy(model).float())"
            )
        if not torch.isfinite(param).all():
            raise ModelError(
                f"model: parameter {name!r} holds NaN or Inf values; fix or retrain the model first"
            )


def prepare_model(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """An eval-mode copy with BatchNorm folded into the preceding Conv when the backend folds it.

    The defended weights must be the ones the backend really quantizes.
    """
    if not isinstance(model, nn.Module):
        if hasattr(model, "graph_module"):  # torch.export.ExportedProgram
            raise ModelError(_EXPORTED)
        raise ModelError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_finite_weights(model)
    refuse_quantized_layers(model)
    prepared = copy.deepcopy(model).eval()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
    if not (scheme.folds_batchnorm and has_bn):
        return prepared
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(prepared)
    except Exception as exc:  # symbolic tracing failed: data-dependent control flow
        raise ModelError(
            f"model: BatchNorm cannot be folded because torch.fx cannot trace {type(model).__name__} ({exc}). "
            "Fold BatchNorm yourself (torch.fx.experimental.optimization.fuse) or use a scheme with "
            "folds_batchnorm=False"
        ) from None


def fingerprint(weight: torch.Tensor) -> str:
    """A digest of the float weights a plan was made from."""
    data = weight.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def on_device_of(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``t`` (a layer's bias, captured on the CPU) where ``x`` is: forward functions run on any device."""
    return None if t is None else t.to(x.device)


def layer_forward(layer: nn.Module):
    """(x, weight) -> the layer's output with the given weight, for the rounding optimiser."""
    bias = layer.bias.detach() if getattr(layer, "bias", None) is not None else None
    if isinstance(layer, nn.Linear):
        return lambda x, w: nn.functional.linear(x, w, on_device_of(bias, x))
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        conv = nn.functional.conv1d if isinstance(layer, nn.Conv1d) else nn.functional.conv2d
        if layer.padding_mode != "zeros":
            raise ModelError(
                f"layer {layer}: padding_mode {layer.padding_mode!r} is not supported; use 'zeros'"
            )
        return lambda x, w: conv(
            x, w, on_device_of(bias, x), layer.stride, layer.padding, layer.dilation, layer.groups
        )
    if isinstance(layer, CONV_TRANSPOSE):  # w arrives output channels first (core_weight)
        deconv = (
            nn.functional.conv_transpose1d
            if isinstance(layer, nn.ConvTranspose1d)
            else nn.functional.conv_transpose2d
        )  # (torch allows a ConvTranspose no padding_mode but zeros)
        args = (layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
        return lambda x, w: deconv(x, w.movedim(0, 1), on_device_of(bias, x), *args)
    raise ModelError(f"layer: expected Conv1d, Conv2d, ConvTranspose or Linear, got {type(layer).__name__}")


def relu_after(model: nn.Module) -> dict[str, str | None]:
    """Conv/Linear layers whose only consumer is a ReLU: layer name -> the ReLU module's name (None when
    the ReLU is a function call). Found by torch.fx tracing; a model that does not trace gives {}.
    """
    import torch.fx

    try:
        graph = (
            model.graph if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model).graph
        )
    except Exception as exc:  # torch.fx raises many types on untraceable code
        log.warning(
            "%s does not trace with torch.fx (%s: %s); no ReLU is folded into a unit, so L_A preserves "
            "every layer's raw output (as with unit='layer')",
            type(model).__name__,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return {}
    modules = dict(model.named_modules())
    found: dict[str, str | None] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), QUANTIZABLE):
            continue
        users = list(node.users)
        if len(users) != 1:
            continue
        user = users[0]
        if user.op == "call_module" and isinstance(modules.get(user.target), nn.ReLU):
            found[node.target] = user.target
        elif user.op in ("call_function", "call_method") and user.target in (
            torch.relu,
            nn.functional.relu,
            "relu",
        ):
            found[node.target] = None
    return found


def followed_by_relu(model: nn.Module) -> set[str]:
    """Names of Conv/Linear layers whose only consumer is a ReLU (the reference's unit: layer + activation)."""
    return set(relu_after(model))
