"""efrap-plugin: EFRAP (Li et al., CVPR 2024) against quantization-conditioned backdoors.

The backend-neutral core. ``defend(model, calib_data, scheme, config) -> RoundingPlan``; adapters
(installed beside it, one per backend) turn plans into real int8 artifacts.
"""

from .analysis import LayerScan, crowded_layers, format_scan, scan_weights
from .checkpoint import load_model, save_model
from .cifar import load_cifar10
from .config import HOLDOUT_CHOICES, EFRAPConfig
from .conformance import IntegerReport, compare_integers
from .data import (
    LabeledData,
    Splits,
    as_calibration,
    as_labeled,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_npz,
    load_npz_inputs,
)
from .engine import capture, defend
from .errors import DataError, EFRAPError, ModelError, PlanMismatchError
from .evaluate import (
    ATTACK_BARS,
    REMOVAL_BARS,
    Metrics,
    Outcomes,
    as_predictor,
    asr,
    attack_fires,
    backdoor_removed,
    clean_acc,
    compare,
    der,
    evaluate,
    intervals,
    outcomes,
    paired_change,
    predict,
    ra,
    wilson_interval,
)
from .fake_quant import fake_quant_forward
from .files import atomic_write, check_writable, read_safetensors, safetensors_shapes, staged
from .held_out import (
    MIN_HOLDOUT,
    HeldOut,
    Measurement,
    held_out_indices,
    inputs_needed,
    split_calibration,
    split_sizes,
    take_rows,
)
from .layer_inputs import LAYER_INPUTS, LayerInputs, check_layer_inputs, mix_layer_inputs, pick_layer_inputs
from .layers import (
    CONV_TRANSPOSE,
    core_weight,
    execution_order,
    fingerprint,
    layer_kinds,
    on_device_of,
    prepare_model,
    quantizable_layers,
    relu_after,
)
from .loop import defend_layers, warn_tied_weights
from .models import DigitsCNN, ResNet, TokenEncoder, build_model, resnet8, resnet20
from .objective import learnable_bounds, truncation_error
from .plan import LayerPlan, RoundingPlan, grid_record, snap_integers, snap_weight
from .rounding import (
    BUDGET_STRENGTHS,
    LayerProblem,
    LayerResult,
    budget_strengths,
    learn_rounding,
    path_steps,
    rounding_path,
)
from .schemes import SCHEME_PRESETS, ActivationQuantizer, QuantScheme, scheme_preset
from .training import resolve_device, train
from .triggers import PatchTrigger

__version__ = "0.1.0"

__all__ = [
    "ATTACK_BARS",
    "BUDGET_STRENGTHS",
    "CONV_TRANSPOSE",
    "HeldOut",
    "Measurement",
    "MIN_HOLDOUT",
    "ActivationQuantizer",
    "DataError",
    "DigitsCNN",
    "EFRAPConfig",
    "HOLDOUT_CHOICES",
    "EFRAPError",
    "IntegerReport",
    "LabeledData",
    "LAYER_INPUTS",
    "LayerInputs",
    "LayerPlan",
    "LayerProblem",
    "LayerScan",
    "LayerResult",
    "Metrics",
    "ModelError",
    "PatchTrigger",
    "PlanMismatchError",
    "REMOVAL_BARS",
    "QuantScheme",
    "ResNet",
    "RoundingPlan",
    "TokenEncoder",
    "SCHEME_PRESETS",
    "Splits",
    "as_calibration",
    "as_labeled",
    "as_predictor",
    "asr",
    "attack_fires",
    "check_layer_inputs",
    "backdoor_removed",
    "budget_strengths",
    "atomic_write",
    "check_writable",
    "build_model",
    "capture",
    "clean_acc",
    "compare",
    "compare_integers",
    "core_weight",
    "defend",
    "defend_layers",
    "der",
    "evaluate",
    "intervals",
    "outcomes",
    "Outcomes",
    "paired_change",
    "execution_order",
    "fake_quant_forward",
    "fingerprint",
    "crowded_layers",
    "format_scan",
    "grid_record",
    "on_device_of",
    "mix_layer_inputs",
    "pick_layer_inputs",
    "layer_kinds",
    "learn_rounding",
    "path_steps",
    "rounding_path",
    "split_calibration",
    "split_sizes",
    "take_rows",
    "learnable_bounds",
    "held_out_indices",
    "inputs_needed",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_model",
    "load_npz",
    "load_npz_inputs",
    "predict",
    "prepare_model",
    "quantizable_layers",
    "relu_after",
    "ra",
    "read_safetensors",
    "safetensors_shapes",
    "save_model",
    "scan_weights",
    "resnet20",
    "resnet8",
    "scheme_preset",
    "snap_integers",
    "snap_weight",
    "staged",
    "resolve_device",
    "train",
    "truncation_error",
    "warn_tied_weights",
    "wilson_interval",
    "__version__",
]
