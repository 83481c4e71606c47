"""EFRAP for torchao's ``quantize_(model, config)``: the grid read from the user's base config, the
learned integers written by torchao's own ``quantize_`` into its own quantized tensors.

The base config's weight grid is an absmax grid per row, per group or per tensor (torchao's
``choose_qparams_affine`` with SYMMETRIC mapping, rounding ``w * (1 / scale)``), which
``QuantScheme`` reproduces bit for bit. EFRAP learns on a copy of the model, layer by layer, with the
layers before each one on their learned integers and activations as the config treats them (float for
weight-only configs, quantized per token for dynamic ones); then every learned weight is snapped to its
grid points, each group's abs-max element exact, so that torchao's ``quantize_`` recomputes the same
scales and rounds to the plan's integers: same tensor subclass, same kernels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from efrap_plugin import (
    EFRAPConfig,
    EFRAPError,
    FoundLayers,
    IntegerReport,
    QuantScheme,
    RoundingPlan,
    TorchModelProducer,
    compare_integers,
    core_weight,
    run,
)
from efrap_plugin.plan import snap_weight

__all__ = ["QuantizeProducer", "quantize_", "quantize_scheme", "read_quantized_weights", "verify_quantize"]

log = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]


def _granularity(granularity: Any, where: str) -> dict[str, Any]:
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow, PerTensor

    if isinstance(granularity, PerTensor):
        return {"per_channel": False}
    if isinstance(granularity, PerRow) or (isinstance(granularity, PerAxis) and granularity.axis == 0):
        return {"per_channel": True}
    if isinstance(granularity, PerGroup):
        return {"per_channel": True, "group_size": int(granularity.group_size)}
    raise EFRAPError(
        f"{where}: weight granularity {granularity!r}; EFRAP learns PerTensor, PerRow / PerAxis(0), PerGroup"
    )


def _symmetric(mapping: Any, where: str) -> None:
    from torchao.quantization.quant_primitives import MappingType

    if mapping != MappingType.SYMMETRIC:
        raise EFRAPError(
            f"{where}: weight mapping {mapping}; EFRAP learns torchao's SYMMETRIC weight grid (the configs' "
            "default), whose scale it recomputes exactly"
        )


def _intx_bits(dtype: torch.dtype, where: str) -> int:
    bits = {getattr(torch, f"int{b}"): b for b in range(1, 9)}.get(dtype)
    if bits is None or bits < 2:
        raise EFRAPError(f"{where}: weight dtype {dtype}; EFRAP learns 2- to 8-bit integer grids")
    return bits


def quantize_scheme(config: Any) -> tuple[QuantScheme, str]:
    """The weight grid ``config`` rounds to, and how its activations are treated ("float", or
    "per-token-symmetric" / "per-token-asymmetric" for dynamic int8 activations).

    Raises EFRAPError naming the config and the field for what EFRAP does not learn on (float8, the
    packed int4 layouts, asymmetric weights, a scale dtype of its own, HQQ parameter search).
    """
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    where = type(config).__name__
    if isinstance(config, Int8WeightOnlyConfig):
        bits, grid, acts, floor = 8, _granularity(config.granularity, where), "float", None
    elif isinstance(config, Int8DynamicActivationInt8WeightConfig):
        granularity = config.granularity
        weight = granularity[1] if isinstance(granularity, (list, tuple)) else granularity
        if config.reduce_range:
            raise EFRAPError(
                f"{where}: reduce_range=True; EFRAP learns the full int8 grid (reduce_range=False)"
            )
        bits, grid, floor = 8, _granularity(weight, where), None
        symmetric = config.act_mapping_type == MappingType.SYMMETRIC
        acts = "per-token-symmetric" if symmetric else "per-token-asymmetric"
    elif isinstance(config, (IntxWeightOnlyConfig, Int8DynamicActivationIntxWeightConfig)):
        dynamic = isinstance(config, Int8DynamicActivationIntxWeightConfig)
        _symmetric(config.weight_mapping_type if dynamic else config.mapping_type, where)
        scale_dtype = config.weight_scale_dtype if dynamic else config.scale_dtype
        if scale_dtype not in (None, torch.float32):
            raise EFRAPError(f"{where}: scale dtype {scale_dtype}; EFRAP learns float32 scales (None)")
        if config.intx_choose_qparams_algorithm != IntxChooseQParamsAlgorithm.AFFINE:
            raise EFRAPError(
                f"{where}: intx_choose_qparams_algorithm {config.intx_choose_qparams_algorithm}; EFRAP learns "
                "the AFFINE algorithm's scales"
            )
        bits, floor = _intx_bits(config.weight_dtype, where), torch.finfo(torch.float32).smallest_normal
        grid = _granularity(config.weight_granularity if dynamic else config.granularity, where)
        acts = (
            (
                "per-token-symmetric"
                if config.act_mapping_type == MappingType.SYMMETRIC
                else "per-token-asymmetric"
            )
            if dynamic
            else "float"
        )
    else:
        raise EFRAPError(
            f"quantize_ config: {where} is not one EFRAP learns; it learns Int8WeightOnlyConfig, "
            "Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig and Int8DynamicActivationIntxWeightConfig "
            "(symmetric weights)"
        )
    scheme = QuantScheme(
        name="torchao-quantize",
        bits=bits,
        qmin=-(2 ** (bits - 1)),
        qmax=2 ** (bits - 1) - 1,
        range_rule="absmax",
        scale_precision="float32",
        inverse_scale=True,
        folds_batchnorm=False,
        scale_floor=floor,
        **grid,
    )
    return scheme, acts


def _dynamic_activation(x: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """What a dynamic int8 config does to a Linear's input: quantized per token, with torchao's own
    primitives, and dequantized."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    kwargs = {"quant_min": -128, "quant_max": 127}
    scale, zero_point = choose_qparams_affine(
        x, mapping, block, torch.int8, eps=torch.finfo(torch.float32).eps, **kwargs
    )
    q = quantize_affine(x, block, scale, zero_point, torch.int8, **kwargs)
    return dequantize_affine(q, block, scale, zero_point, torch.int8, output_dtype=x.dtype, **kwargs)


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


class QuantizeProducer(TorchModelProducer):
    """``quantize_``'s producer: ``defend``'s copies of the model, the layers the config's filter
    selects, the base config's grid, and its activations as it treats them."""

    source = "torchao"
    flow = "torchao-quantize_"

    def __init__(self, model: nn.Module, base_config: Any, filter_fn: FilterFn | None = None) -> None:
        scheme, self.activations = quantize_scheme(base_config)
        select = filter_fn or _default_filter
        # asked of the user's own modules, as torchao's quantize_ asks it (a filter may test identity)
        self.selected = {fqn for fqn, m in model.named_modules() if fqn and select(m, fqn)}
        self.base_config = base_config
        super().__init__(model, scheme)

    def find_layers(self, calib: torch.Tensor, config: EFRAPConfig) -> FoundLayers:
        found = super().find_layers(calib, config)
        selected = self.selected
        skipped = {name: why for name, why in found.skipped.items() if name in selected}
        for name, module in self.layers:
            if name in selected and self.scheme.group_size is not None and not isinstance(module, nn.Linear):
                skipped[name] = (
                    f"{type(module).__name__}: torchao groups a convolution's weights along its input channels "
                    "only; EFRAP learns per-group grids on Linear layers; left at nearest rounding"
                )
        learned = {name for name, _ in self.layers} & selected
        for name in sorted(selected - learned - set(skipped)):
            module = self.prepared.get_submodule(name)
            if getattr(module, "weight", None) is not None:
                skipped[name] = (
                    f"{type(module).__name__}: a layer EFRAP does not learn; left at nearest rounding"
                )
        self.layers = [(name, m) for name, m in self.layers if name in learned and name not in skipped]
        if not self.layers:
            raise EFRAPError(
                f"quantize_: {type(self.base_config).__name__}'s filter selects no Linear / Conv layer EFRAP "
                "learns in this model"
            )
        return FoundLayers([name for name, _ in self.layers], skipped)

    def quantize_activations(self, quantized: nn.Module, calib: torch.Tensor) -> None:
        if self.activations == "float":
            return
        symmetric = self.activations == "per-token-symmetric"
        for name, _ in self.layers:
            quantized.get_submodule(name).register_forward_pre_hook(
                lambda _m, inp: (_dynamic_activation(inp[0], symmetric),) + tuple(inp[1:])
            )


def quantize_(
    model: nn.Module,
    base_config: Any,
    calib_data: Any,
    config: EFRAPConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> RoundingPlan:
    """torchao's ``quantize_(model, base_config, filter_fn)`` with EFRAP's rounding: in place, as
    torchao's is, and the plan returned for ``verify_quantize`` and saving.

    ``filter_fn(module, fqn)``: the layers to quantize, as torchao takes it (default: every Linear).
    """
    from torchao.quantization import quantize_ as torchao_quantize_

    plan = run(QuantizeProducer(model, base_config, filter_fn), calib_data, config, progress=progress)
    with torch.no_grad():
        for name, lp in plan.layers.items():
            module = model.get_submodule(name)
            snapped = snap_weight(core_weight(module), lp, plan.scheme).to(module.weight.dtype)
            # a new Parameter: a weight tied to another module (an embedding) is not written through
            module.weight = nn.Parameter(snapped, requires_grad=False)
    torchao_quantize_(model, base_config, filter_fn=filter_fn)
    return plan


def read_quantized_weights(
    source: nn.Module | Mapping[str, Any] | torch.export.ExportedProgram,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Integers, scales and zero points of every weight torchao's ``quantize_`` left as a quantized
    tensor (its ``qdata`` / ``scale`` / ``zero_point``), keyed by module name; from the model, a state
    dict it saved, or ``torch.export.export`` of it. Scales per row come back as [C], per group as
    [C, groups]."""
    if isinstance(source, torch.export.ExportedProgram):
        source = source.state_dict
    if isinstance(source, nn.Module):
        items = ((name, getattr(m, "weight", None)) for name, m in source.named_modules())
    else:
        items = ((key.removesuffix(".weight"), t) for key, t in source.items() if key.endswith(".weight"))
    ints, scales, zero_points = {}, {}, {}
    for name, weight in items:
        if weight is None or not hasattr(weight, "qdata") or not hasattr(weight, "scale"):
            continue
        qdata = weight.qdata
        ints[name] = qdata.to(torch.int32)
        scale = weight.scale.to(torch.float32)
        scales[name] = scale.reshape(qdata.shape[0], -1).squeeze(1) if scale.numel() > 1 else scale.reshape(1)
        zp = getattr(weight, "zero_point", None)
        if zp is not None and zp.numel():
            zero_points[name] = zp.to(torch.int64).reshape(-1)
    return ints, scales, zero_points


def verify_quantize(
    source: nn.Module | Mapping[str, Any] | torch.export.ExportedProgram,
    plan: RoundingPlan,
    strict: bool = True,
) -> IntegerReport:
    """Compare the integers in ``source`` (the ``quantize_``d model, its state dict or its exported
    program) with ``plan``,
    bit for bit, scales and zero points too; a quantized weight the plan lacks fails."""
    ints, scales, zero_points = read_quantized_weights(source)
    return compare_integers(
        plan, ints, scales, strict=strict, where="the quantize_d model", zero_points=zero_points
    )
